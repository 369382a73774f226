"""Rewards: spec strings to callables (`specs`), and the Bradley–Terry reward model (`reward_model`)."""
