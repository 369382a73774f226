"""kill -9 at random moments, then resume until done: does the run equal an uninterrupted one bit for bit?

    python bench/kill_resume.py [--trials 20] [--iterations 8] [--seed 0]

Runs recipes/tiny.yaml once uninterrupted, then `trials` times: start the same run, kill it with SIGKILL at a
random moment (after a random number of logged iterations, 0 to all but one, plus a random part of an
iteration: some kills land before the first checkpoint, some while one is written), then restart it until it finishes: `rlhflab train --resume
RUN` once it has a checkpoint, before that either `--resume` or the original `train` command (both must start it
again); about half of the first restarts are killed again. Each trial compares metrics.jsonl (every key but timings) and every tensor of final/ with the
uninterrupted run, exactly. Prints one line per trial and the count that matched. CPU-only, a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from rlhflab.runs.tracking import MACHINE_METRICS

REPO = Path(__file__).resolve().parent.parent


def command(run_dir: Path, iterations: int, resume: bool) -> list[str]:
    head = [sys.executable, "-m", "rlhflab", "train"]
    target = ["--resume", str(run_dir)] if resume else ["recipes/tiny.yaml", "--out", str(run_dir)]
    return [*head, *target, "-q", "--set", f"train.iterations={iterations}", "--set", "train.checkpoint_every=2",
            "--set", "eval.report=false"]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def wait_for_rows(run_dir: Path, n: int, proc: subprocess.Popen) -> None:
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and (metrics.read_text().count("\n") if metrics.exists() else 0) < n:
        time.sleep(0.02)


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(MACHINE_METRICS)}
            for line in lines]


def weights(run_dir: Path) -> dict:
    return {k: v for f in sorted((run_dir / "final").glob("*.safetensors")) for k, v in load_file(f).items()}


def same(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return rows(a) == rows(b) and wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill_resume_"))
    whole = root / "whole"
    t0 = time.perf_counter()
    proc = start(command(whole, args.iterations, resume=False))
    _, err = proc.communicate()
    duration = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"the uninterrupted run failed:\n{err}")
    per_iteration = sum(r["time/iteration"] for r in map(json.loads, (whole / "metrics.jsonl").open()))
    per_iteration /= args.iterations
    startup = duration - per_iteration * args.iterations  # imports, model, final save: the rest of the run
    print(f"uninterrupted: {args.iterations} iterations in {duration:.1f} s ({per_iteration:.1f} s per iteration) "
          f"→ {whole}")
    matched = 0
    for trial in range(1, args.trials + 1):
        run_dir = root / f"trial{trial:02d}"
        # a random moment by progress, not by the clock (the machine's speed varies): after `rows` logged
        # iterations (0: during start-up, before the first checkpoint), a random part of an iteration later
        rows_before = rng.randint(0, args.iterations - 1)
        proc = start(command(run_dir, args.iterations, resume=False))
        wait_for_rows(run_dir, rows_before, proc)
        kill_at = rng.uniform(0.0, per_iteration if rows_before else startup)
        time.sleep(kill_at)
        finished_first = proc.poll() is not None
        proc.kill()
        proc.wait()
        metrics = run_dir / "metrics.jsonl"
        reached = metrics.read_text().count("\n") if metrics.exists() else 0  # whole rows (a kill may cut one)
        pointer = run_dir / "checkpoints" / "latest"
        had_checkpoint = pointer.read_text().strip() if pointer.exists() else "none"
        restarts, kills = 0, 1
        while True:
            restarts += 1
            # with a checkpoint only --resume continues; without one, either command starts it again
            resume = pointer.exists() or rng.random() < 0.5
            proc = start(command(run_dir, args.iterations, resume=resume))
            if restarts < 4 and rng.random() < 0.5:  # killed again, sooner
                time.sleep(rng.uniform(0.5, startup + per_iteration * args.iterations / 2))
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                    kills += 1
                    continue
            _, err = proc.communicate()
            if proc.returncode != 0:
                print(f"trial {trial:2d}: restart {restarts} failed (exit {proc.returncode}): {err.strip()[-300:]}")
                break
            if (run_dir / "final").is_dir():
                break
        ok = (run_dir / "final").is_dir() and same(run_dir, whole)
        matched += ok
        where = "after the end" if finished_first else f"{reached} rows logged"
        print(f"trial {trial:2d}: killed {kill_at:3.1f} s after row {rows_before} ({where}, checkpoint {had_checkpoint}), "
              f"{kills} kill(s), "
              f"{restarts} restart(s): {'identical' if ok else 'DIFFERENT'}")
    print(f"{matched} of {args.trials} killed-and-resumed runs equal the uninterrupted run bit for bit "
          f"(metrics without timings, final weights)")


if __name__ == "__main__":
    main()
