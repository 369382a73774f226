"""Crash-safe checkpoints, by fault injection: an exception or a kill at every file write, fsync, rename and
delete inside a save leaves `latest` naming a complete checkpoint that loads (the previous one or the new one),
and the next save succeeds."""

from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import torch

from rlhflab import files
from rlhflab.runs import checkpoint
from rlhflab.runs.checkpoint import latest_checkpoint, load_checkpoint, remove_partial_checkpoints, save_checkpoint

# every operation a save performs on the file system, by where it is looked up at call time
OPERATIONS = [
    (checkpoint, "save_file"),
    (pathlib.Path, "write_text"),
    (files, "open"),  # write_atomic's builtin open, looked up in the module first
    (os, "fsync"),
    (os, "replace"),
    (os, "open"),
    (shutil, "rmtree"),
]


class Fault(Exception):
    pass


def _tensors(iteration: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(iteration)
    tensors = {"policy": {"w": torch.randn(4, 3, generator=g)}, "critic": {"v": torch.randn(3, generator=g)}}
    state = {"iteration": iteration, "opt": {"exp_avg": torch.randn(5, generator=g)}, "beta": 0.1 * iteration}
    return tensors, state


def _save(run_dir, iteration: int) -> None:
    tensors, state = _tensors(iteration)
    save_checkpoint(run_dir, iteration, tensors, state, keep=2)


def _loads_as_one_of(run_dir, iterations: set[int]) -> int:
    """The checkpoint `latest` names is complete and equal to what was saved at its iteration."""
    path = latest_checkpoint(run_dir)
    tensors, state = load_checkpoint(path)
    want_tensors, want_state = _tensors(state["iteration"])
    assert state["iteration"] in iterations
    assert torch.equal(tensors["policy"]["w"], want_tensors["policy"]["w"])
    assert torch.equal(tensors["critic"]["v"], want_tensors["critic"]["v"])
    assert torch.equal(state["opt"]["exp_avg"], want_state["opt"]["exp_avg"]) and state["beta"] == want_state["beta"]
    return state["iteration"]


def _patch(monkeypatch, before) -> None:
    """Wrap every operation so that `before(index)` runs ahead of it. Only outermost calls count: the
    os.open and os.replace calls inside shutil.rmtree are part of that one operation."""
    depth = [0]
    seen = [0]
    for owner, name in OPERATIONS:
        real = getattr(owner, name, None) or open

        def wrapper(*a, _real=real, **k):
            if depth[0] == 0:
                seen[0] += 1
                before(seen[0] - 1)
            depth[0] += 1
            try:
                return _real(*a, **k)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(owner, name, wrapper, raising=False)


def _count_operations(monkeypatch, run_dir) -> int:
    calls = []
    _patch(monkeypatch, calls.append)
    _save(run_dir, 3)
    monkeypatch.undo()
    return len(calls)


def _inject(monkeypatch, at: int, fail) -> None:
    """Make the `at`-th file-system operation (0-based) call `fail()` instead of running."""
    _patch(monkeypatch, lambda index: fail() if index == at else None)


@pytest.fixture
def run_with_two_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    _save(run_dir, 1)
    _save(run_dir, 2)
    return run_dir


def test_a_save_is_made_of_many_operations(run_with_two_checkpoints, monkeypatch):
    assert _count_operations(monkeypatch, run_with_two_checkpoints) >= 15  # the loops below cover each one


def test_an_exception_at_any_operation_leaves_a_loadable_latest(tmp_path, monkeypatch):
    probe = tmp_path / "probe"
    _save(probe, 1)
    _save(probe, 2)
    n = _count_operations(monkeypatch, probe)
    outcomes = set()
    for at in range(n):
        run_dir = tmp_path / f"run{at}"
        _save(run_dir, 1)
        _save(run_dir, 2)

        def fail():
            raise Fault(f"injected at operation {at}")

        _inject(monkeypatch, at, fail)
        with pytest.raises(Fault):
            _save(run_dir, 3)
        monkeypatch.undo()
        outcomes.add(_loads_as_one_of(run_dir, {2, 3}))
        _save(run_dir, 3)  # the retry succeeds and is the one `latest` names
        assert _loads_as_one_of(run_dir, {3}) == 3
        assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    assert outcomes == {2, 3}  # faults before the pointer moved keep 2; after it (pruning), 3


def test_a_kill_at_any_operation_leaves_a_loadable_latest(tmp_path, monkeypatch):
    """As above, with the process killed (no cleanup runs): the save happens in a forked child that exits
    without unwinding at the injected operation."""
    probe = tmp_path / "probe"
    _save(probe, 1)
    _save(probe, 2)
    n = _count_operations(monkeypatch, probe)
    for at in range(n):
        run_dir = tmp_path / f"run{at}"
        _save(run_dir, 1)
        _save(run_dir, 2)
        pid = os.fork()
        if pid == 0:  # the child: dies inside the save
            try:
                _inject(monkeypatch, at, lambda: os._exit(137))
                _save(run_dir, 3)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 137, f"operation {at} was never reached"
        _loads_as_one_of(run_dir, {2, 3})
        remove_partial_checkpoints(run_dir)  # what the next start does
        _save(run_dir, 3)
        assert _loads_as_one_of(run_dir, {3}) == 3


def test_saving_the_iteration_latest_names_again_keeps_it(run_with_two_checkpoints, monkeypatch):
    """A run resumed at its last iteration saves that iteration again: the complete copy stays, untouched."""
    before = (run_with_two_checkpoints / "checkpoints" / "iter_000002" / "state.json").stat().st_mtime_ns
    _inject(monkeypatch, 0, lambda: (_ for _ in ()).throw(Fault("no file operation expected")))
    _save(run_with_two_checkpoints, 2)
    monkeypatch.undo()
    assert (run_with_two_checkpoints / "checkpoints" / "iter_000002" / "state.json").stat().st_mtime_ns == before
    assert _loads_as_one_of(run_with_two_checkpoints, {2}) == 2


def test_a_checkpoint_saved_but_never_pointed_at_is_replaced(run_with_two_checkpoints):
    """Killed between the rename and the pointer: iter 3 exists, `latest` names 2; the resumed run saves 3."""
    root = run_with_two_checkpoints / "checkpoints"
    shutil.copytree(root / "iter_000002", root / "iter_000003")  # stands in for a stale, unpointed copy
    _save(run_with_two_checkpoints, 3)
    assert _loads_as_one_of(run_with_two_checkpoints, {3}) == 3
