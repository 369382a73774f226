"""The distributed engine: several processes, one run (data-parallel PPO through Accelerate: DDP or FSDP2)."""
