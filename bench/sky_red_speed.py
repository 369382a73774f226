"""Seconds per PPO iteration on the embedded model at the settings of TRL 0.10.1's anchor run.

TRL's PPOTrainer on this task, measured with `--with-trl` on a quiet 2-core AMD EPYC (Zen 4) on 2026-12-01:
62–65 s per iteration (13–16 s generation, 48–50 s forwards and update), 3.65 GiB peak RSS. Settings: 16 prompts × 1 sample, 32 new tokens, temperature 1.0, full
fine-tuning, value head on the policy trunk, β 0.05, 4 PPO epochs, minibatch 4, lr 1.41e-5.

    python bench/sky_red_speed.py --iterations 5

Prints one line per iteration, then a summary; the last line is `s_per_iteration=<median>`.

    python bench/sky_red_speed.py --iterations 5 --with-trl

`--with-trl` measures the anchor itself, side by side on the same machine in one run: after our iterations
(never concurrently, so the two never share the cores) it runs bench/trl_anchor/trl_ppo_speed.py — TRL
0.10.1's PPOTrainer at the settings above, on the same local model directory, for the same number of
iterations — in its own venv (`bash bench/trl_anchor/setup.sh` creates bench/trl_anchor/.venv; TRL 0.10.1
needs transformers 4.x), streams its lines prefixed `trl| `, and then prints the CPU (model name; whether
it has amx_bf16 / avx512_bf16), both medians, and `ratio_vs_trl=<ours/TRL>`. Without the flag nothing
about TRL runs and the quoted 62 s stands in for the anchor; the last line is `s_per_iteration=` either way.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rlhflab.config import load_config
from rlhflab.models.loading import keep_freed_memory, quiet_transformers
from rlhflab.models.precision import cpu_bf16_flags
from rlhflab.ppo.trainer import PPOTrainer
from rlhflab.runs.seeding import seed_everything
from rlhflab.runs.tracking import Tracker

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "sky_red_broad.yaml"  # one prompt set, as TRL
TRL_DIR = Path(__file__).resolve().parent / "trl_anchor"
TRL_PYTHON = TRL_DIR / ".venv" / "bin" / "python"
TRL_SETTINGS = [
    "rollout.prompts_per_iteration=16", "rollout.samples_per_prompt=1", "rollout.max_new_tokens=32",
    "rollout.temperature=1.0", "rollout.top_k=0", "rollout.top_p=1.0", "model.lora.enabled=false",
    "model.critic=shared", "ppo.advantage_estimator=gae", "ppo.kl_coef=0.05", "ppo.adaptive_kl_target=null",
    "ppo.epochs=4", "ppo.minibatch_size=4", "ppo.micro_batch_size=null", "train.learning_rate=1.41e-5",
    "eval.probes=null",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra dotted.key=value")
    parser.add_argument("--with-trl", action="store_true",
                        help="afterwards run TRL 0.10.1's PPOTrainer (bench/trl_anchor) and print ratio_vs_trl")
    args = parser.parse_args()
    if args.with_trl and not TRL_PYTHON.exists():
        parser.error(f"--with-trl needs the anchor venv: run `bash {TRL_DIR / 'setup.sh'}` first")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(RECIPE, TRL_SETTINGS + [f"train.iterations={args.iterations}"] + args.overrides)
    quiet_transformers()
    keep_freed_memory()  # as `rlhflab train` does: 9 % of an iteration
    seed_everything(config.train.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = PPOTrainer(config, run_dir)
        tracker = Tracker(Path(run_dir), [], "bench", "bench", {})
        rows = []
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {trainer.device}")
        for _ in range(args.iterations):
            m = trainer.iteration_step(tracker)
            rows.append(m)
            print(f"iter {trainer.iteration}: generate {m['time/generate']:.2f} s  reward {m['time/score']:.3f} s  "
                  f"ref+value forwards {m['time/forwards']:.2f} s  update {m['time/update']:.2f} s  "
                  f"total {m['time/iteration']:.2f} s  tokens/s {m['throughput/tokens_per_s']:.0f}  "
                  f"answer length {m['rollout/response_length']:.1f}")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    med = {k: statistics.median(r[k] for r in rows) for k in
           ("time/generate", "time/score", "time/forwards", "time/update", "time/iteration", "throughput/tokens_per_s")}
    print(f"median: rollout {med['time/generate']:.2f} s, reward {med['time/score']:.3f} s, "
          f"forwards {med['time/forwards']:.2f} s, update {med['time/update']:.2f} s, "
          f"tokens/s {med['throughput/tokens_per_s']:.0f}, peak RSS {peak_gib:.2f} GiB")
    if args.with_trl:
        trl_s, trl_rss = run_trl(config.model.name, args.iterations, args.threads)
        cpu, flags = cpu_info()
        print(f"cpu: {cpu}; amx_bf16 {'yes' if 'amx_bf16' in flags else 'no'}, "
              f"avx512_bf16 {'yes' if 'avx512_bf16' in flags else 'no'}; {os.cpu_count()} cores")
        print(f"ours {med['time/iteration']:.2f} s/iteration (peak RSS {peak_gib:.2f} GiB), "
              f"TRL 0.10.1 {trl_s:.2f} s/iteration (peak RSS {trl_rss:.2f} GiB)")
        print(f"ratio_vs_trl={med['time/iteration'] / trl_s:.2f}")
    else:
        print(f"vs TRL 0.10.1 (62 s/iteration, measured 2026-12-01): {med['time/iteration'] / 62:.2f}x")
    print(f"s_per_iteration={med['time/iteration']:.2f}")


def model_dir(spec: str) -> str:
    try:
        from rlhflab.models.loading import resolve_model_dir
    except ImportError:
        from rlhflab.models import resolve_model_dir
    return resolve_model_dir(spec)


def run_trl(spec: str, iterations: int, threads: int | None) -> tuple[float, float]:
    """TRL 0.10.1's anchor in its own venv, after ours; returns (median s/iteration, peak RSS GiB)."""
    cmd = [str(TRL_PYTHON), str(TRL_DIR / "trl_ppo_speed.py"), "--model-dir", model_dir(spec),
           "--iterations", str(iterations)] + (["--threads", str(threads)] if threads else [])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    print(f"running TRL's anchor: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        print(f"trl| {line}", end="", flush=True)
    if proc.wait() != 0:
        sys.exit(f"TRL's anchor failed (exit {proc.returncode})")
    text = "".join(lines)
    s = re.findall(r"^s_per_iteration=([0-9.]+)$", text, re.M)
    rss = re.findall(r"^peak_rss_gib=([0-9.]+)$", text, re.M)
    if not s:
        sys.exit("TRL's anchor printed no s_per_iteration= line")
    return float(s[-1]), float(rss[-1]) if rss else float("nan")


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its native bf16 flags (the ones `model.dtype: auto` decides by)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")
    return name, cpu_bf16_flags()


if __name__ == "__main__":
    main()
