"""Whole jobs built from the stages: train (PPO + evaluation + report), sweeps, pair generation, the RLHF loop."""
