"""Where metrics go: RUN_DIR/metrics.jsonl and samples.jsonl always; TensorBoard, W&B, MLflow when named.

Trackers are imported only when a recipe names them, so the core runs on a bare install.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import re
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from rlhflab.config import flatten
from rlhflab.errors import UserError
from rlhflab.files import write_atomic

# prefixes of metrics that measure the machine (and its load), not the run: left out when runs are compared
MACHINE_METRICS = ("time/", "throughput/", "memory/")
MLFLOW_DB = "mlflow.db"  # the run's MLflow store: sqlite:///RUN_DIR/mlflow.db
_MLFLOW_BAD = re.compile(r"[^/\w.\- :]")  # characters MLflow refuses in a metric name


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None shows the gap instead of breaking the file
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}  # a sample's NaN reward components
    return value


def wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id a run directory logged to, None if none. Read from the run file W&B writes
    (wandb/<mode>-run-<time>-<id>[-N]/run-<id>.wandb), not the folder's name: a process resumed within the same
    second gets a folder with a -1 suffix."""
    files = (Path(run_dir) / "wandb").glob("*run-*/run-*.wandb")
    ids = {path.stem.removeprefix("run-") for path in files}
    if len(ids) > 1:
        raise UserError(f"{run_dir / 'wandb'} holds several W&B runs ({', '.join(sorted(ids))}); keep one")
    return ids.pop() if ids else None


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


def require_trackers(trackers: list[str]) -> None:
    """Import each named tracker's package; a missing one is a UserError naming the extra to install."""
    for name in trackers:
        try:
            importlib.import_module(name)  # each tracker's extra is named after its package
        except ImportError:
            raise UserError(
                f"log.trackers names '{name}' but it is not installed: pip install 'rlhflab[{name}]'"
            ) from None


@contextmanager
def _quiet_logger(name: str):
    """Hide one library logger's INFO lines for a moment, leaving the process's logging set-up as it was."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class Tracker:
    """Writes metrics.jsonl / samples.jsonl and forwards each metric row to the trackers the recipe names.

    `start_iteration` is the checkpoint a resumed run continues from (0: a fresh run). Trackers that can resume
    pick up the run they logged before: TensorBoard hides what the last process logged past that checkpoint,
    MLflow and W&B continue the same run id. `close(status)` ends each tracker's run as FINISHED, FAILED (an
    exception) or KILLED (a signal).
    """

    def __init__(self, run_dir: Path, trackers: list[str], project: str, run_name: str, config: dict,
                 start_iteration: int = 0):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        require_trackers(trackers)
        self.backends = [getattr(self, f"_open_{name}")(project, run_name, config, start_iteration)
                         for name in trackers]

    def _open_tensorboard(self, project, run_name, config, start):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops events an earlier process wrote past the checkpoint this run resumes at
        writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start + 1)
        # the config as an indented (code) block in the Text tab, at the iteration it applies from
        text = yaml.safe_dump(config, sort_keys=False)
        writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), global_step=start)

        def log(metrics, step):
            for key, value in metrics.items():
                writer.add_scalar(key, value, step)

        return log, lambda status: writer.close()

    def _open_wandb(self, project, run_name, config, start):
        import wandb

        run_id = wandb_run_id(self.run_dir)
        resume = {"id": run_id, "resume": "allow"} if start and run_id else {}
        # silent: no banners or sync hints; console off: W&B would wrap stdout/stderr to copy them
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False)
        run = wandb.init(project=project, name=run_name, config=config, dir=str(self.run_dir),
                         mode=config["log"]["wandb_mode"], settings=settings, **resume)
        return (lambda m, step: run.log(m, step=step),
                lambda status: run.finish(exit_code=0 if status == "FINISHED" else 1))

    def _open_mlflow(self, project, run_name, config, start):
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        # a database store in the run directory: MLflow 3 refuses the file store (./mlruns)
        with _quiet_logger("mlflow.store.db.utils"):  # "Creating initial MLflow database tables..."
            client = MlflowClient(f"sqlite:///{(self.run_dir / MLFLOW_DB).resolve()}")
        experiment = client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(
            project, artifact_location=(self.run_dir / "mlflow-artifacts").resolve().as_uri())
        earlier = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"])
        if start and earlier:
            run_id, logged = earlier[0].info.run_id, earlier[0].data.params
            client.update_run(run_id, status="RUNNING")
        else:  # a run stopped before its first checkpoint logs its iterations again, as metrics.jsonl does
            for run in earlier:
                client.delete_run(run.info.run_id)
            run_id, logged = client.create_run(experiment_id, run_name=run_name).info.run_id, {}
        # params are write-once in MLflow: a resumed run adds new keys only (config.yaml holds its whole config)
        params = [Param(key, value if isinstance(value, str) else json.dumps(value))
                  for key, value in flatten(config).items() if key not in logged]
        client.log_batch(run_id, params=params)

        def log(metrics, step):
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(_MLFLOW_BAD.sub("_", key), value, now, step)
                                              for key, value in metrics.items()])

        return log, lambda status: client.set_terminated(run_id, status=status)

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

    def close(self, status: str = "FINISHED") -> None:
        """End each tracker's run with status FINISHED, FAILED or KILLED; closing twice does nothing."""
        backends, self.backends = self.backends, []
        for _, close_fn in backends:
            close_fn(status)


class NullTracker:
    """The tracker of every process but process 0 in a data-parallel run: process 0 writes the run's logs."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_samples(self, rows: list[dict]) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass
