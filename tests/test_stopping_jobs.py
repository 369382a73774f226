"""SIGTERM / Ctrl-C in the jobs made of trainings: a sweep stops inside its running training (checkpointed) and
resumes to the result of an unbroken sweep; the RLHF loop stops inside reward-model training and inside PPO and
re-runs to the summary of an unbroken loop. The signal is sent by the process to itself from inside a step, so
where it lands is exact."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rlhflab.cli import app
from rlhflab.errors import Stopped
from rlhflab.pipelines.sweep import run_sweep
from rlhflab.ppo.trainer import PPOTrainer
from rlhflab.rewards import reward_model
from rlhflab.runs.checkpoint import latest_checkpoint
from tests.test_stopping import rows_without_timings
from tests.test_sweep import write_sweep

runner = CliRunner()


def signal_on_call(monkeypatch, owner, name: str, call: int, sig=signal.SIGTERM) -> None:
    """Make the `call`-th call (1-based) of owner.name send `sig` to this process first."""
    real = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def test_a_sweep_stops_inside_a_run_and_resumes_to_the_unbroken_result(tmp_path, monkeypatch):
    sweep = write_sweep(tmp_path, {"ppo.kl_coef": [0.0, 0.1]}, seeds=[0], extra={"set": {
        "train.iterations": 2, "train.checkpoint_every": 100, "train.save_final": False, "eval.report": False,
        "rollout.prompts_per_iteration": 2, "rollout.max_new_tokens": 6, "ppo.minibatch_size": 4}})
    whole = run_sweep(sweep, tmp_path / "whole")

    signal_on_call(monkeypatch, PPOTrainer, "update", call=3)  # the second run's first iteration
    with pytest.raises(Stopped, match=r"\[2/2\] kl_coef=0.1__seed=0: stopped by SIGTERM at iteration 1 of 2; "
                                      r"checkpoint saved; run the same `rlhflab sweep` again") as stopped:
        run_sweep(sweep, tmp_path / "broken")
    monkeypatch.undo()
    assert stopped.value.exit_code == 143
    broken = tmp_path / "broken"
    record = json.loads((broken / "sweep.json").read_text())
    assert [r["status"] for r in record["runs"]] == ["done", "stopped"]
    assert latest_checkpoint(broken / "kl_coef=0.1__seed=0").name == "iter_000001"  # the iteration reached

    resumed = run_sweep(sweep, broken)
    assert [r["status"] for r in resumed["runs"]] == ["done", "done"]
    for entry in whole["runs"]:
        assert rows_without_timings(broken / entry["dir"]) == rows_without_timings(tmp_path / "whole" / entry["dir"])


def test_the_loop_stops_in_rm_training_and_in_ppo_and_reruns_to_the_unbroken_summary(loop_file, tmp_path,
                                                                                        monkeypatch):
    def loop(out: Path, code: int = 0) -> str:
        result = runner.invoke(app, ["rlhf", str(loop_file), "--out", str(out), "-q"])
        assert result.exit_code == code, result.output
        return " ".join(result.output.split())

    spec = yaml.safe_load(loop_file.read_text())
    spec["rm"]["batch_size"] = 2  # several batches, so the signal lands inside reward-model training
    loop_file.write_text(yaml.safe_dump(spec))
    loop(tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())["rounds"]
    out = tmp_path / "broken"

    signal_on_call(monkeypatch, reward_model, "bradley_terry_loss", call=1, sig=signal.SIGINT)
    said = loop(out, 130)
    monkeypatch.undo()
    assert "round 1: stopped by SIGINT in epoch 1 of 1; a reward model is saved only when complete" in said, said
    assert "re-run `rlhflab rlhf" in said and "Traceback" not in said
    assert not (out / "round_1" / "rm").exists()  # nothing half-written

    signal_on_call(monkeypatch, PPOTrainer, "update", call=1)  # round 1's only PPO iteration
    said = loop(out, 143)
    monkeypatch.undo()
    assert "round 1: stopped by SIGTERM at iteration 1 of 1; checkpoint saved; re-run" in said
    assert latest_checkpoint(out / "round_1" / "ppo").name == "iter_000001"

    loop(out)
    resumed = json.loads((out / "summary.json").read_text())["rounds"]
    assert [{k: v for k, v in r.items() if k not in ("rm", "ppo", "policy")} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in ("rm", "ppo", "policy")} for r in whole]
