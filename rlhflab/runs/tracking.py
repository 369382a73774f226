"""Where metrics go: RUN_DIR/metrics.jsonl and samples.jsonl always; TensorBoard, W&B, MLflow when named.

Trackers are imported only when a recipe names them, so the core runs on a bare install.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlhflab.errors import UserError
from rlhflab.files import write_atomic

_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None shows the gap instead of breaking the file
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}  # a sample's NaN reward components
    return value


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file ([] if absent). A cut-off last line (run killed mid-write) is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line") from err
    return rows


def truncate_jsonl(path: Path, after_iteration: int) -> None:
    """Drop rows logged after a checkpoint, so a resumed run does not log an iteration twice."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # cut off by a kill mid-write: that iteration was never checkpointed
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line") from err
        if row["iteration"] <= after_iteration:
            keep.append(line)
    write_atomic(path, "".join(line + "\n" for line in keep))  # a crash here must not lose the log


class Tracker:
    def __init__(self, run_dir: Path, trackers: list[str], project: str, run_name: str, config: dict):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.backends = []
        for name in trackers:
            try:
                self.backends.append(getattr(self, f"_open_{name}")(project, run_name, config))
            except ImportError:
                raise UserError(
                    f"log.trackers names '{name}' but it is not installed: pip install 'rlhflab[{_EXTRAS[name]}]'"
                ) from None

    def _open_tensorboard(self, project, run_name, config):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return (lambda m, step: [writer.add_scalar(k, v, step) for k, v in m.items()], writer.close)

    def _open_wandb(self, project, run_name, config):
        import wandb

        run = wandb.init(project=project, name=run_name, config=config, dir=str(self.run_dir),
                         mode=config["log"]["wandb_mode"])
        return (lambda m, step: run.log(m, step=step), run.finish)

    def _open_mlflow(self, project, run_name, config):
        import mlflow

        mlflow.set_tracking_uri(f"file://{(self.run_dir / 'mlruns').resolve()}")
        mlflow.set_experiment(project)
        mlflow.start_run(run_name=run_name)
        return (lambda m, step: mlflow.log_metrics({k.replace("/", "."): v for k, v in m.items()}, step=step),
                mlflow.end_run)

    def log(self, metrics: dict, step: int) -> None:
        row = {"iteration": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        for log_fn, _ in self.backends:
            log_fn(numeric, step)

    def log_samples(self, rows: list[dict]) -> None:
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps(_jsonable(row)) + "\n")

    def close(self) -> None:
        for _, close_fn in self.backends:
            close_fn()
