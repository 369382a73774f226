"""Whole jobs built from the stages: `train` (the PPO run with its outputs around it)."""

from __future__ import annotations

import time
from pathlib import Path

from rlhflab.config import Config, config_from_dict, read_yaml, save_config
from rlhflab.errors import UserError


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]PPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[status]}"), transient=False)


def train(config: Config, out: str | Path, reward=None, resume: bool = False, quiet: bool = False):
    """Run PPO as configured; write metrics, samples, checkpoints and RUN_DIR/final. Returns the trainer.

    `reward` overrides config.reward.spec with any callable (prompts, completions, metadata) -> floats.
    """
    from rich.console import Console

    from rlhflab.health import HealthMonitor
    from rlhflab.tracking import Tracker
    from rlhflab.trainer import PPOTrainer

    run_dir = Path(out)
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out")
    console = Console(stderr=True, quiet=quiet)
    started = time.perf_counter()
    trainer = PPOTrainer(config, run_dir, reward=reward)
    if resume:
        trainer.resume()
        console.print(f"resumed {run_dir} at iteration {trainer.iteration}")
    save_config(config, run_dir / "config.yaml")
    c = config
    tracker = Tracker(run_dir, c.log.trackers, c.log.project, c.log.run_name or run_dir.name, c.model_dump(mode="json"))
    monitor = HealthMonitor()
    console.print(f"model loaded in {time.perf_counter() - started:.0f} s; training {c.train.iterations} iterations "
                  f"of {c.rollout_batch_size} samples → {run_dir}")
    try:
        with _progress() if not quiet else _NoProgress() as progress:
            task = progress.add_task("train", total=c.train.iterations, completed=trainer.iteration, status="")
            while trainer.iteration < c.train.iterations:
                m = trainer.iteration_step(tracker)
                for note in monitor.update({"iteration": trainer.iteration, **m}):
                    console.print(f"[yellow]warning[/]: {note.message} — likely cause: {note.cause}; fix: {note.fix}")
                progress.update(task, advance=1, status=(
                    f"reward {m['objective/scores']:.3f}  KL {m['objective/kl']:.2f}  {m['time/iteration']:.1f} s/it"))
        if c.train.checkpoint_every == 0 or trainer.iteration % c.train.checkpoint_every:
            trainer.save()
    finally:
        tracker.close()
    if c.train.save_final:
        trainer.save_final()
    console.print(f"done in {time.perf_counter() - started:.0f} s → {run_dir}")
    return trainer


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run saved, for --resume."""
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' not found; pass the --out folder of an earlier run")
    if not path.is_file():
        raise UserError(f"{path} is missing; '{run_dir}' is not a run directory written by rlhflab train")
    return config_from_dict(read_yaml(path, "run config"), str(path))
