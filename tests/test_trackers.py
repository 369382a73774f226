"""TensorBoard, MLflow and W&B read back through their own readers after a tiny training run: every iteration's
metrics (as in metrics.jsonl) and the run's config; a resumed run continues its tracker runs without repeating
steps (TensorBoard, MLflow); a missing package is a one-line error naming the extra."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from rlhflab.errors import Stopped, UserError
from rlhflab.pipelines.train import train
from rlhflab.runs.tracking import Tracker, wandb_run_id


def _run(tiny_config, run_dir, tracker: str, **kwargs):
    tiny_config.log.trackers = [tracker]
    train(tiny_config, run_dir, quiet=True, **kwargs)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return rows, yaml.safe_load((run_dir / "config.yaml").read_text())


def _series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {key: [(iteration, value), ...]} over the numbers a tracker receives."""
    keys = [k for k, v in rows[0].items() if k != "iteration" and isinstance(v, (int, float))]
    return {k: [(row["iteration"], row[k]) for row in rows] for k in keys}


def _leaves(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _mlflow_runs(run_dir):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhflab")
    return client, client.search_runs([experiment.experiment_id])


def test_tensorboard_reads_back(tiny_config, tmp_path):
    rows, config = _run(tiny_config, tmp_path / "run", "tensorboard")
    events = _tensorboard(tmp_path / "run")
    series = _series(rows)
    assert len(series) > 20 and set(series) <= set(events.Tags()["scalars"])
    for key, expected in series.items():
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert got == [(step, pytest.approx(value, rel=1e-6, abs=1e-12)) for step, value in expected], key
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(textwrap.dedent(text)) == config


def test_mlflow_reads_back(tiny_config, tmp_path, capfd):
    rows, config = _run(tiny_config, tmp_path / "run", "mlflow")
    assert "mlflow" not in "".join(capfd.readouterr()).lower()  # no store-creation chatter on the console
    client, runs = _mlflow_runs(tmp_path / "run")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "run"
    run_id = runs[0].info.run_id
    for key, expected in _series(rows).items():
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert sorted(got) == [(step, pytest.approx(value)) for step, value in expected], key
    params = runs[0].data.params
    leaves = _leaves(config)
    assert set(params) == set(leaves)
    for key, value in leaves.items():
        assert (params[key] if isinstance(value, str) else json.loads(params[key])) == value, key


def _wandb_records(run_dir) -> list[dict]:
    """The records of the offline run's .wandb file, through W&B's own reader (`wandb leet inspect --json`)."""
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_wandb_reads_back(tiny_config, tmp_path, capfd):
    rows, config = _run(tiny_config, tmp_path / "run", "wandb")
    assert "wandb" not in "".join(capfd.readouterr()).lower()  # no banner, no sync hint
    records = _wandb_records(tmp_path / "run")
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["display_name"] == "run" and run["project"] == "rlhflab"
    assert {k: v for k, v in run["config"]["update"].items() if k != "_wandb"} == config
    history = [r["history"] for r in records if r["type"] == "history"]
    for key, expected in _series(rows).items():
        got = [(h["step"]["num"], h["item"][key]) for h in history]
        assert got == [(step, pytest.approx(value)) for step, value in expected], key
    assert [r["exit"]["exit_code"] for r in records if r["type"] == "exit"] == [0]


def test_resumed_run_continues_its_tracker_runs(tiny_config, tmp_path):
    """Killed in iteration 4 after iteration 3 was logged, checkpoint at 2: the resumed run continues the same
    MLflow run and W&B run id, and TensorBoard shows iterations 1-4 once each."""
    calls = []

    def crashes_in_iteration_4(prompts, completions, metadata):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return [1.0] * len(completions)

    run_dir = tmp_path / "run"
    tiny_config.log.trackers = ["tensorboard", "mlflow", "wandb"]
    tiny_config.train.iterations, tiny_config.train.checkpoint_every = 4, 2
    with pytest.raises(UserError, match="killed"):
        train(tiny_config, run_dir, quiet=True, reward=crashes_in_iteration_4)
    _, runs = _mlflow_runs(run_dir)
    assert [r.info.status for r in runs] == ["FAILED"]
    first_id = runs[0].info.run_id
    train(tiny_config, run_dir, resume=True, quiet=True)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [row["iteration"] for row in rows] == [1, 2, 3, 4]
    scores = [(row["iteration"], row["objective/scores"]) for row in rows]
    assert [(e.step, e.value) for e in _tensorboard(run_dir).Scalars("objective/scores")] == scores
    client, runs = _mlflow_runs(run_dir)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(first_id, "FINISHED")]
    steps = sorted(m.step for m in client.get_metric_history(first_id, "objective/scores"))
    assert steps == [1, 2, 3, 3, 4]  # MLflow keeps every value: iteration 3 from before the kill, and again
    ids = {path.stem for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(ids) == 1 and len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    assert wandb_run_id(run_dir) == ids.pop().removeprefix("run-")


def test_wandb_run_id_survives_a_resume_in_the_same_second(tmp_path):
    """A second process in the same second gets the folder offline-run-<time>-<id>-1 (seen in CI)."""
    for folder in ("offline-run-20261202_020459-yhdcisoe", "offline-run-20261202_020459-yhdcisoe-1"):
        (tmp_path / "wandb" / folder).mkdir(parents=True)
        (tmp_path / "wandb" / folder / "run-yhdcisoe.wandb").touch()
    assert wandb_run_id(tmp_path) == "yhdcisoe"
    assert wandb_run_id(tmp_path / "elsewhere") is None


def test_a_signal_ends_the_tracker_runs_killed(tiny_config, tmp_path):
    def sigterm_in_iteration_1(prompts, completions, metadata):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; the run stops after this iteration
        return [1.0] * len(completions)

    tiny_config.log.trackers = ["mlflow"]
    with pytest.raises(Stopped):
        train(tiny_config, tmp_path / "run", quiet=True, reward=sigterm_in_iteration_1)
    _, runs = _mlflow_runs(tmp_path / "run")
    assert [r.info.status for r in runs] == ["KILLED"]


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow"])
def test_missing_tracker_package_is_one_line_error(tiny_config, tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` fail as if it were not installed
    with pytest.raises(UserError) as err:
        Tracker(tmp_path, [name], "p", "r", {})
    assert f"pip install 'rlhflab[{name}]'" in str(err.value) and "\n" not in str(err.value)
    tiny_config.log.trackers = [name]
    with pytest.raises(UserError, match=f"rlhflab\\[{name}\\]"):
        train(tiny_config, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # it failed before the run directory, and the model, were made
