"""Seconds and peak memory of one PPO iteration at 0.5B and 1B parameters on this machine (CPU or GPU).

    python bench/scale_shapes.py [--shapes random-qwen2-0.5b random-llama-1b] [--modes lora full] [--iterations 2]

Each case runs in its own process (so its peak memory is its own): the model is built from a config with random
weights (models/loading.py RANDOM_SHAPES: Qwen2-0.5B's and Llama-3.2-1B's shapes, no download), gradient
checkpointing on, a value head on the policy trunk (GAE), 4 prompts × 2 samples of up to 32 new tokens, one PPO
epoch over one minibatch of 8 in micro-batches of 4. It prints one JSON line per case with the last iteration's
seconds (generate / forwards / update), tokens/s, model TFLOP/s and the process's peak memory (RSS on a CPU,
max_memory_allocated on a GPU), then a table. MFU is model FLOP/s over the peak: on a GPU the data sheet's dense
bf16 peak (distributed/throughput.py); on a CPU the peak of a 4096² matmul in the compute dtype measured here
first — what this CPU's matmul kernels reach, not a data sheet figure.

Full fine-tuning keeps fp32 master weights and AdamW state (16 bytes a parameter) plus a frozen reference; at 1B
that is ~25 GB, over a 24 GiB machine, so `--full-dtype bfloat16` (the default) trains the full cases in pure
bf16 weights (8 bytes a parameter + the reference), as the table says.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def recipe(shape: str, mode: str, full_dtype: str, iterations: int) -> dict:
    return {
        "model": {"name": shape, "prompt_format": "chat", "critic": "shared",
                  "dtype": "auto" if mode == "lora" else full_dtype, "lora": {"enabled": mode == "lora"}},
        "data": {"prompts": str(ROOT / "recipes" / "data" / "sky_train.txt")},
        "rollout": {"prompts_per_iteration": 4, "samples_per_prompt": 2, "max_new_tokens": 32},
        "reward": {"spec": "contains:red"},
        "ppo": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 4},
        "train": {"iterations": iterations, "learning_rate": 1e-5, "gradient_checkpointing": True,
                  "checkpoint_every": 0, "save_final": False},
        "eval": {"report": False},
    }


def run_case(shape: str, mode: str, full_dtype: str, iterations: int) -> None:
    """One case in this process: build, run `iterations` iterations, print the last one's figures as JSON."""
    from rlhflab.config import config_from_dict
    from rlhflab.models.loading import keep_freed_memory, quiet_transformers
    from rlhflab.ppo.trainer import PPOTrainer
    from rlhflab.runs.seeding import seed_everything
    from rlhflab.runs.tracking import Tracker

    quiet_transformers()
    keep_freed_memory()
    seed_everything(0)
    config = config_from_dict(recipe(shape, mode, full_dtype, iterations))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = PPOTrainer(config, run_dir)
        built = time.perf_counter() - started
        tracker = Tracker(Path(run_dir), [], "bench", "scale", {})
        for _ in range(iterations):
            m = trainer.iteration_step(tracker)
    params = sum(p.numel() for p in trainer.policy.parameters())
    trained = sum(p.numel() for p in trainer.policy_params)
    print(json.dumps({
        "shape": shape, "mode": mode, "precision": trainer.precision.log_line, "params": params, "trained": trained,
        "build_s": built, "iteration_s": m["time/iteration"], "generate_s": m["time/generate"],
        "forwards_s": m["time/forwards"], "update_s": m["time/update"],
        "tokens_per_s": m["throughput/tokens_per_s"], "tflops": m["throughput/tflops"],
        "peak_gib": m["memory/peak_gib"], "mfu_datasheet": m.get("throughput/mfu")}), flush=True)


def matmul_peak_tflops(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """TFLOP/s of an n×n matmul in `dtype` on the CPU, best of `repeats` after a warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e12


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["random-qwen2-0.5b", "random-llama-1b"])
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--iterations", type=int, default=2, help="the last one is reported (the first warms up)")
    parser.add_argument("--full-dtype", default="bfloat16", help="model.dtype of the full fine-tuning cases")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # SHAPE,MODE: run one case in this process
    args = parser.parse_args()
    if args.case:
        run_case(*args.case.split(","), args.full_dtype, args.iterations)
        return
    from rlhflab.models.precision import cpu_bf16_flags, resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = None
    if device.type == "cpu":
        compute = torch.bfloat16 if resolve_precision("auto", device).bf16_compute else torch.float32
        peak = matmul_peak_tflops(compute)
        print(f"CPU matmul peak (measured, 4096² {compute}): {peak:.2f} TFLOP/s; "
              f"bf16 flags: {sorted(cpu_bf16_flags())}")
    rows = []
    for shape in args.shapes:
        for mode in args.modes:
            case = [sys.executable, __file__, "--case", f"{shape},{mode}", "--iterations", str(args.iterations),
                    "--full-dtype", args.full_dtype]
            done = subprocess.run(case, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{shape} {mode}: failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["mfu"] = row["mfu_datasheet"] or (row["tflops"] / peak if peak else None)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| model | mode | precision | params (trained) | s/iteration (generate / forwards / update) | tokens/s "
          "| TFLOP/s | MFU | peak memory |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "—"
        print(f"| {r['shape']} | {r['mode']} | {r['precision'].removeprefix('precision: ')} | {r['params'] / 1e9:.2f}B "
              f"({r['trained'] / 1e6:.1f}M) | {r['iteration_s']:.1f} ({r['generate_s']:.1f} / {r['forwards_s']:.1f} / "
              f"{r['update_s']:.1f}) | {r['tokens_per_s']:.0f} | {r['tflops']:.3f} | {mfu} | {r['peak_gib']:.1f} GiB |")


if __name__ == "__main__":
    main()
