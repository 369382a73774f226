"""Nothing lost when a run stops: a run killed before its first checkpoint starts again from iteration 0 with
either command; SIGTERM / Ctrl-C checkpoint the iteration reached and exit 143 / 130; a second Ctrl-C aborts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhflab.errors import UserError
from rlhflab.pipelines.train import train
from rlhflab.runs.checkpoint import latest_checkpoint
from rlhflab.runs.seeding import seed_everything
from rlhflab.runs.tracking import MACHINE_METRICS

REPO = Path(__file__).resolve().parent.parent


def rows_without_timings(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(MACHINE_METRICS)} for row in rows]


def _killed_before_first_checkpoint(whole: Path, run_dir: Path) -> None:
    """What a kill -9 after two iterations (checkpoint_every larger) leaves: the config, two rows and a cut-off
    third one, no checkpoint, a half-built checkpoint directory."""
    run_dir.mkdir()
    shutil.copy(whole / "config.yaml", run_dir / "config.yaml")
    lines = (whole / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])
    (run_dir / "checkpoints" / ".iter_000003.4242.tmp").mkdir(parents=True)


@pytest.mark.parametrize("resume", [False, True], ids=["train-again", "resume"])
def test_a_run_killed_before_its_first_checkpoint_starts_again(tiny_config, tmp_path, resume, capsys):
    tiny_config.train.iterations = 3
    whole = tmp_path / "whole"
    train(tiny_config, whole, quiet=True)
    killed = tmp_path / "killed"
    _killed_before_first_checkpoint(whole, killed)
    seed_everything(0)
    train(tiny_config, killed, resume=resume)
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines at the console width
    assert "stopped before its first checkpoint" in err and "starts it again from iteration 0" in err
    assert ("--resume" in err) == resume
    assert rows_without_timings(killed) == rows_without_timings(whole)  # the same run, each iteration logged once
    assert not list((killed / "checkpoints").glob(".iter_*.tmp"))  # the orphan is gone


def test_train_and_resume_agree_on_a_run_with_a_checkpoint(tiny_config, tmp_path):
    train(tiny_config, tmp_path / "run", quiet=True)
    with pytest.raises(UserError, match=r"already holds a run \(checkpoint iter_000002\); continue it with "
                                        r"`rlhflab train --resume"):
        train(tiny_config, tmp_path / "run", quiet=True)


def test_out_that_is_a_file_is_a_one_line_error(tiny_config, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file; pick a folder"):
        train(tiny_config, tmp_path / "file", quiet=True)


def _start(run_dir: Path, iterations: int, *more: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rlhflab", "train", "recipes/tiny.yaml", "--out", str(run_dir), "-q",
           "--set", f"train.iterations={iterations}", "--set", "train.checkpoint_every=1000",
           "--set", "eval.report=false", "--set", "train.save_final=false", *more]
    return subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _wait_for_rows(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    code = proc.poll()
    proc.kill()  # a 400-iteration run left behind would outlive the test by many minutes
    proc.wait()
    raise AssertionError(f"no {n} rows in {metrics} in time (exit {code})")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_the_iteration_reached_and_resume_finishes(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, iterations=400)
    _wait_for_rows(run_dir, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"stopped by {sig.name} at iteration" in err and "--resume" in err
    reached = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["iteration"]
    assert latest_checkpoint(run_dir).name == f"iter_{reached:06d}"  # no work after the last row is lost
    done = subprocess.run([sys.executable, "-m", "rlhflab", "train", "--resume", str(run_dir), "-q",
                           "--set", f"train.iterations={reached + 1}"],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert [row["iteration"] for row in rows_without_timings(run_dir)] == list(range(1, reached + 2))


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    run_dir = tmp_path / "run"
    # long answers, so the second Ctrl-C lands while the first one waits for the iteration to end
    proc = _start(run_dir, 400, "--set", "rollout.max_new_tokens=200")
    _wait_for_rows(run_dir, 1, proc)
    proc.send_signal(signal.SIGINT)
    first = proc.stderr.readline()
    while first == "\n":  # the notice starts on a fresh line
        first = proc.stderr.readline()
    assert "press Ctrl-C again" in first
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "aborted" in err and "checkpoint saved" not in err, err
