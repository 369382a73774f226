"""The random streams of a run. Seeding is process-wide, so only a job's entry point does it, explicitly:
`seed_everything` before it builds its models (pipelines.train, bench/); library functions that need
repeatable samples use `seeded`, which leaves the caller's streams as they were."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu"):
    """Inside: torch's generators seeded with `seed`; afterwards the caller's RNG state is restored."""
    device = torch.device(device)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
