"""Seconds to save and load one checkpoint of a SmolLM2-135M-sized full fine-tune (weights + AdamW moments,
fp32, no critic), in rlhflab's safetensors + JSON format, with torch.save/torch.load of the same state as a
reference. Random tensors stand in for the model: the format, not the values, sets the time.

    python bench/checkpoint_io.py [--params 134515008]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rlhflab.runs.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=134_515_008, help="parameter count (SmolLM2-135M)")
    args = parser.parse_args()
    rows = 4096
    params = [torch.nn.Parameter(torch.randn(rows, args.params // rows // 30)) for _ in range(30)]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # creates exp_avg, exp_avg_sq, step
    weights = {"policy": {f"p{i}": p.detach() for i, p in enumerate(params)}}
    n = sum(p.numel() for p in params)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        run = Path(tmp)
        t0 = time.perf_counter()
        save_checkpoint(run, 1, weights, {"policy_opt": optimizer_state(opt), "rng": rng_state()}, keep=1)
        t1 = time.perf_counter()
        _, state = load_checkpoint(latest_checkpoint(run))
        load_optimizer_state(opt, state["policy_opt"])
        t2 = time.perf_counter()
        size = sum(f.stat().st_size for f in (run / "checkpoints").rglob("*") if f.is_file())
        ref = run / "state.pt"
        t3 = time.perf_counter()
        torch.save({"weights": weights, "opt": opt.state_dict()}, ref)
        t4 = time.perf_counter()
        torch.load(ref, weights_only=True)  # the reference only: this bench wrote the file itself
        t5 = time.perf_counter()
    print(f"{n / 1e6:.0f} M parameters, checkpoint {size / 2**30:.2f} GiB")
    print(f"safetensors + JSON: save {t1 - t0:.1f} s (fsynced), load + optimizer restore {t2 - t1:.1f} s")
    print(f"torch.save / torch.load reference: save {t4 - t3:.1f} s (not fsynced), load {t5 - t4:.1f} s")


if __name__ == "__main__":
    main()
