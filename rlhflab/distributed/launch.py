"""Is this process part of a launch (torchrun, `accelerate launch`)? Read from the environment only, so the
command line can ask before importing torch."""

from __future__ import annotations

import os

from rlhflab.errors import UserError


def launched() -> bool:
    """True inside a multi-process launch (torchrun and `accelerate launch` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_launch() -> None:
    """`accelerate launch --cpu --num_processes N` starts one process unless MPI is set up: say so rather than
    train alone. That launcher sets MASTER_ADDR for N > 1 but no WORLD_SIZE."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
    if use_cpu and "MASTER_ADDR" in os.environ and not launched():
        raise UserError("`accelerate launch --cpu` started 1 process: without MPI it cannot start more; on CPU use "
                        "`accelerate launch --multi_gpu --num_processes N` (gloo, no GPU needed) or torchrun")
