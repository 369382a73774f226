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


def stream_seed(*keys: int) -> int:
    """A 63-bit seed that is a function of `keys` alone (e.g. run seed, stream, iteration, global sample index),
    well mixed (NumPy's SeedSequence), so neighbouring keys give unrelated streams."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def stream_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded with `stream_seed(*keys)`: a random stream that belongs to one thing (a sample, an
    epoch's shuffle) rather than to a process, so results do not depend on how many processes share the work."""
    return torch.Generator().manual_seed(stream_seed(*keys))


def sample_uniforms(keys: tuple[int, ...], indices, steps: int) -> torch.Tensor:
    """(len(indices), steps) uniforms in [0, 1): row i from the stream of (*keys, indices[i]), the draws that pick
    sample i's tokens (rollout.StepSampler) whichever process samples it and whatever else is in its batch."""
    return torch.stack([torch.rand(steps, generator=stream_generator(*keys, i)) for i in indices])
