"""Atomic writes: a reader (or a resumed run after a crash) sees the old file or the new one, never half of one.

Each writer builds its output under a temporary sibling name, fsyncs it, renames it into place and fsyncs the
parent directory, so the rename itself survives a power cut.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_sibling(path: Path) -> Path:
    # hidden, per process (two writers never share one), and created with open/mkdir so the umask applies
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) in one step."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_file(final: str | Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` to write a temporary sibling file, fsync it and rename it to `final` (for writers that
    stream a large file themselves, e.g. GGUF). A failed build leaves nothing behind and the old file in place."""
    final = Path(final)
    tmp = _temporary_sibling(final)
    try:
        build(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)
    return final


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON, atomically."""
    return write_atomic(path, json.dumps(data, indent=2) + "\n")


def atomic_dir(final: str | Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` on a fresh temporary sibling directory, fsync what it wrote, and rename it to `final`.

    An empty `final` is replaced; a non-empty one raises FileExistsError (and ours is discarded), so a caller
    decides whether someone else's finished copy is good enough. A failed build leaves nothing behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed earlier attempt of this process id
    try:
        tmp.mkdir()
        build(tmp)
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(Path(root) / name, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(Path(root))
        try:
            os.replace(tmp, final)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{final} already exists and is not empty") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    return final
