"""rlhflab: PPO with a KL penalty to a frozen reference, and the tools to measure what it changed."""
