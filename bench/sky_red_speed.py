"""Seconds per PPO iteration on the embedded model at the settings of TRL 0.10.1's anchor run.

TRL's PPOTrainer on this task and a 2-core box: 51 s per iteration (5 s generation, 46 s forwards and
update), 3.8 GiB peak RSS. Settings: 16 prompts × 1 sample, 32 new tokens, temperature 1.0, full
fine-tuning, value head on the policy trunk, β 0.05, 4 PPO epochs, minibatch 4, lr 1.41e-5.

    python bench/sky_red_speed.py --iterations 5

Prints one line per iteration, then a summary; the last line is `s_per_iteration=<median>`.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
from pathlib import Path

import torch

from rlhflab.config import load_config
from rlhflab.tracking import Tracker
from rlhflab.trainer import PPOTrainer

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "sky_red.yaml"
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(RECIPE, TRL_SETTINGS + [f"train.iterations={args.iterations}"] + args.overrides)
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
    print(f"vs TRL 0.10.1 (51 s/iteration): {med['time/iteration'] / 51:.2f}x")
    print(f"s_per_iteration={med['time/iteration']:.2f}")


if __name__ == "__main__":
    main()
