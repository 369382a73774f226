"""The GPU check: does rlhflab train on this machine's GPUs, how fast, in how much memory?

    python bench/gpu_check.py [--iterations 6] [--out /tmp/gpu_check]

1. The device: name, count, memory, bf16 support; the data-sheet peak used for MFU (distributed/throughput.py).
2. The main job (recipes/sky_red.yaml) on the embedded model, `model.dtype: auto` (bf16 autocast on a GPU), for
   `--iterations` iterations: s/iteration, tokens/s, MFU, peak memory, KL and the first-minibatch ratio (1 up to
   rounding: bf16 must not make the sampled and trained policies differ).
3. The 0.5B and 1B shapes (bench/scale_shapes.py) in LoRA and full fine-tuning, bf16 autocast over fp32 masters.
4. With 2+ GPUs: recipes/tiny.yaml and the main job launched on every GPU with configs/accelerate/ddp.yaml and
   fsdp.yaml against 1 GPU: the same samples and the metric differences, and each launch's throughput.

It prints each step's lines and, at the end, one markdown table for docs/scale.md. Nothing here runs on a CPU-only
machine: it says so and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MACHINE = ("time/", "throughput/", "memory/")


def sh(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    print("$", " ".join(command), flush=True)
    done = subprocess.run(command, cwd=ROOT, text=True, capture_output=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        print(done.stderr[-4000:], flush=True)
    return done


def train(recipe: str, out: Path, iterations: int, launch: list[str] | None = None, *more: str) -> list[dict]:
    """Rows of metrics.jsonl of `rlhflab train` (under `launch`, e.g. accelerate launch ...), [] if it failed."""
    command = [*(launch or [sys.executable]), "-m", "rlhflab", "train", recipe, "--out", str(out), "-q",
               "--set", f"train.iterations={iterations}", "--set", "eval.report=false", *more]
    if sh(command).returncode != 0:
        return []
    return [json.loads(line) for line in (out / "metrics.jsonl").open()]


def summary(name: str, rows: list[dict]) -> dict:
    last = rows[-1]
    later = rows[1:] or rows  # the first iteration warms up (allocator, kernels)
    mean = lambda key: sum(r[key] for r in later) / len(later)  # noqa: E731
    return {"run": name, "s/it": mean("time/iteration"), "tokens/s": mean("throughput/tokens_per_s"),
            "MFU": mean("throughput/mfu") if "throughput/mfu" in last else None, "peak GiB": last["memory/peak_gib"],
            "KL": last["objective/kl"], "first ratio": last["policy/ratio_first_minibatch"]}


def compare(a: list[dict], b: list[dict]) -> float:
    """Largest relative difference of a metric between two runs of the same recipe (machine metrics aside)."""
    worst = 0.0
    for x, y in zip(a, b):
        for key, value in x.items():
            if key.startswith(MACHINE) or value is None or y.get(key) is None:
                continue
            worst = max(worst, abs(value - y[key]) / max(abs(value), 1e-6))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu_check"))
    parser.add_argument("--skip-shapes", action="store_true", help="leave out step 3")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (the CPU paths are tested by the test suite)")
        sys.exit(1)
    from rlhflab.distributed.throughput import gpu_peak_flops

    gpus = torch.cuda.device_count()
    device = torch.device("cuda:0")
    props = torch.cuda.get_device_properties(device)
    peak = gpu_peak_flops(device)
    print(f"1. {gpus} × {props.name}, {props.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}, "
          f"compute capability {props.major}.{props.minor}; peak for MFU: {peak[1] if peak else 'unknown'}")
    rows = []
    main_job = train("recipes/sky_red.yaml", args.out / "sky_red", args.iterations)
    if main_job:
        rows.append(summary("sky_red.yaml, 1 GPU, bf16 autocast", main_job))
        print("2.", rows[-1], flush=True)
    if not args.skip_shapes:
        done = sh([sys.executable, "bench/scale_shapes.py", "--full-dtype", "bf16-autocast"])
        print("3.", done.stdout, flush=True)
    if gpus > 1:
        for recipe, iterations in (("recipes/tiny.yaml", 3), ("recipes/sky_red.yaml", args.iterations)):
            name = Path(recipe).stem
            one = train(recipe, args.out / f"{name}-1gpu", iterations, None, "--set", "model.device=cuda:0")
            for config in ("ddp", "fsdp"):
                launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                          f"configs/accelerate/{config}.yaml", "--num_processes", str(gpus)]
                many = train(recipe, args.out / f"{name}-{config}", iterations, launch)
                if many and one:
                    samples = [(args.out / f"{name}-{n}" / "samples.jsonl").read_text() for n in ("1gpu", config)]
                    rows.append(summary(f"{name}, {config.upper()} × {gpus} GPUs", many))
                    print(f"4. {name} {config}: same samples as 1 GPU: {samples[0] == samples[1]}; largest "
                          f"relative metric difference {compare(one, many):.2e}", flush=True)
    print("\n| run | s/iteration | tokens/s | MFU | peak memory | KL | first-minibatch ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mfu = f"{100 * r['MFU']:.1f} %" if r["MFU"] is not None else "—"
        print(f"| {r['run']} | {r['s/it']:.2f} | {r['tokens/s']:.0f} | {mfu} | {r['peak GiB']:.1f} GiB | "
              f"{r['KL']:.2f} | {r['first ratio']:.4f} |")


if __name__ == "__main__":
    main()
