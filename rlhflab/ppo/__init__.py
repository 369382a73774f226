"""The PPO core: rollout → KL → advantages → losses, run by the trainer loop."""
