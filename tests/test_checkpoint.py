"""Checkpoints: safetensors + JSON round trips, no pickle anywhere, old-format and crash handling."""

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhflab.errors import UserError
from rlhflab.runs import checkpoint
from rlhflab.runs.checkpoint import (
    join_tensors,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    split_tensors,
)

PACKAGE = Path(__file__).resolve().parent.parent / "rlhflab"


def test_split_and_join_round_trip_nested_state():
    state = {"a": 1, "b": [torch.arange(3), (2.5, None)], "c": {"d": torch.ones(2, 2, dtype=torch.bfloat16)}}
    tensors = {}
    as_json = split_tensors(state, tensors)
    assert set(tensors) == {"b.0", "c.d"}
    assert as_json["b"][0] == {"$tensor": "b.0"} and as_json["b"][1] == [2.5, None]  # a tuple comes back a list
    back = join_tensors(as_json, tensors)
    assert torch.equal(back["b"][0], torch.arange(3)) and back["c"]["d"].dtype == torch.bfloat16


def test_split_rejects_integer_keys():
    with pytest.raises(TypeError, match="non-string keys"):
        split_tensors({"state": {0: torch.zeros(1)}}, {})


def _adam_after_steps(steps: int, seed: int = 0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    for _ in range(steps):
        opt.zero_grad()
        (params[0].sum() ** 2 + params[1].pow(3).sum()).backward()
        opt.step()
    return params, opt


def test_optimizer_state_round_trips_through_files(tmp_path):
    params, opt = _adam_after_steps(3)
    save_checkpoint(tmp_path, 3, {"policy": {"p0": params[0].detach(), "p1": params[1].detach()}},
                    {"opt": optimizer_state(opt)}, keep=2)
    weights, state = load_checkpoint(latest_checkpoint(tmp_path))

    fresh = [torch.nn.Parameter(weights["policy"]["p0"].clone()), torch.nn.Parameter(weights["policy"]["p1"].clone())]
    fresh_opt = torch.optim.AdamW(fresh, lr=1e-2, fused=True)
    load_optimizer_state(fresh_opt, state["opt"])
    for original, loaded in zip(opt.state.values(), fresh_opt.state.values()):
        assert set(original) == set(loaded) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(original[k], loaded[k]) for k in original)
    # one more step from the restored state lands exactly where the original lands
    for ps, o in ((params, opt), (fresh, fresh_opt)):
        o.zero_grad()
        (ps[0].sum() ** 2 + ps[1].pow(3).sum()).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))


def test_rng_state_round_trips_through_files(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    random.gauss(0, 1)  # a cached gaussian is part of Python's state
    save_checkpoint(tmp_path, 1, {}, {"rng": rng_state()}, keep=1)
    expected = torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(3)
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    set_rng_state(load_checkpoint(latest_checkpoint(tmp_path))[1]["rng"])
    got = torch.rand(5), random.random(), random.gauss(0, 1), np.random.rand(3)
    assert torch.equal(got[0], expected[0]) and got[1:3] == expected[1:3] and np.array_equal(got[3], expected[3])


def test_checkpoint_holds_only_safetensors_and_json(tmp_path):
    path = save_checkpoint(tmp_path, 7, {"policy": {"w": torch.ones(2)}}, {"rng": rng_state(), "beta": 0.05}, keep=1)
    assert sorted(f.name for f in path.iterdir()) == ["policy.safetensors", "state.json", "state.safetensors"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "iter_000007"


def test_keep_prunes_old_checkpoints_and_crash_leftovers(tmp_path):
    leftover = tmp_path / "checkpoints" / ".iter_000002.999999.tmp"
    leftover.mkdir(parents=True)
    for it in (1, 2, 3):
        save_checkpoint(tmp_path, it, {}, {"it": it}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_000002", "iter_000003", "latest"]


def test_no_pickle_in_the_package():
    """Nothing in rlhflab unpickles: no torch.load, no pickle module (a checkpoint or model file cannot run code)."""
    pattern = re.compile(r"torch\.load\b|\bimport pickle\b|\bpickle\.|weights_only")
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_old_format_checkpoint_is_a_one_line_error(tmp_path):
    old = tmp_path / "checkpoints" / "iter_000004"
    old.mkdir(parents=True)
    (old / "state.pt").write_bytes(b"\x80\x04pickled")
    (old / "policy.safetensors").write_bytes(b"")
    (tmp_path / "checkpoints" / "latest").write_text("iter_000004")
    with pytest.raises(UserError, match=r"older rlhflab.*new --out") as info:
        latest_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


def test_pointer_to_an_incomplete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "checkpoints" / "iter_000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("iter_000001")
    with pytest.raises(UserError, match="incomplete"):
        latest_checkpoint(tmp_path)


def test_crash_before_the_marker_keeps_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, {"policy": {"w": torch.zeros(2)}}, {"iteration": 1}, keep=3)
    real_save_file = checkpoint.save_file

    def crash_after_the_tensors(tensors, filename):
        real_save_file(tensors, filename)
        if Path(filename).name == "state.safetensors":  # the last tensor file; state.json would come next
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint, "save_file", crash_after_the_tensors)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, {"policy": {"w": torch.ones(2)}}, {"iteration": 2}, keep=3)
    monkeypatch.undo()

    path = latest_checkpoint(tmp_path)
    assert path.name == "iter_000001"
    weights, state = load_checkpoint(path)
    assert state == {"iteration": 1} and torch.equal(weights["policy"]["w"], torch.zeros(2))
    assert not (tmp_path / "checkpoints" / "iter_000002").exists()


def test_cuda_rng_states_are_saved_and_restored_per_device(tmp_path, monkeypatch):
    """(No GPU here: torch.cuda is stubbed with two devices.) Each device's state goes out and comes back."""
    states = {0: torch.arange(4, dtype=torch.uint8), 1: torch.arange(4, 8, dtype=torch.uint8)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[0], states[1]])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))
    save_checkpoint(tmp_path, 1, {}, {"rng": rng_state()}, keep=1)
    set_rng_state(load_checkpoint(latest_checkpoint(tmp_path))[1]["rng"])
    assert set(restored) == {0, 1} and all(torch.equal(restored[d], states[d]) for d in states)
