"""The one atomic-write helper: old content or new, never half, and no temporary files left behind."""

import json

import pytest

from rlhflab import files
from rlhflab.files import atomic_dir, write_atomic, write_json_atomic


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    write_json_atomic(tmp_path / "b.json", {"x": [1, 2]})
    assert path.read_text() == "new" and json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    write_atomic(path, "old")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_builds_replaces_an_empty_dir_and_refuses_a_full_one(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    atomic_dir(final, lambda tmp: (tmp / "sub").mkdir() or (tmp / "sub" / "f").write_text("1"))
    assert (final / "sub" / "f").read_text() == "1"
    with pytest.raises(FileExistsError, match="not empty"):
        atomic_dir(final, lambda tmp: (tmp / "g").write_text("2"))
    assert sorted(p.name for p in final.rglob("*")) == ["f", "sub"] and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_leaves_nothing_when_the_build_fails(tmp_path):
    def build(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError):
        atomic_dir(tmp_path / "out", build)
    assert list(tmp_path.iterdir()) == []
