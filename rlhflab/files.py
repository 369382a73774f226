"""Files: reading what users hand us (UTF-8 text, YAML with unique keys) with one-line errors, and atomic writes.

Reading: a missing file, a folder, a binary file, a YAML syntax error or a key given twice is a UserError naming
the file (and line) and the fix, for every YAML file we read (recipes, run configs, probes, sweeps, loop files).

Writing: a reader (or a resumed run after a crash) sees the old file or the new one, never half of one. Each
writer builds its output under a temporary sibling name, fsyncs it, renames it into place and fsyncs the
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

import yaml

from rlhflab.errors import UserError


def read_text(path: str | Path, what: str, fix: str, kind: str = "text") -> str:
    """The UTF-8 text of the file a user named as `what` (e.g. "prompt file"); `fix` says what to pass instead."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a directory; {fix}")
    if not path.is_file():
        raise UserError(f"{what} '{path}' not found; {fix}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a {kind} file (byte {e.start} is not UTF-8); {fix}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} '{path}': {e.strerror}; {fix}") from None


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"key {key!r} appears twice (also at line {first_line}); keep one (YAML would silently "
                         "keep only the last)")
        self.line = line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a mapping with the same key twice instead of keeping the last value."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden key by key
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)):  # unhashable: the base loader reports it
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise DuplicateKeyError(key, line, seen[key])
                seen[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, what: str, fix: str, keys: str) -> dict:
    """A YAML mapping from the file a user named as `what`; `keys` says what the mapping holds (for the error
    when it is empty or not a mapping), `fix` what to pass instead when the file is missing or binary."""
    path = Path(path)
    text = read_text(path, what, fix, kind="text YAML")
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKeyError as e:
        raise UserError(f"{path} line {e.line}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e
        raise UserError(f"{path}{where}: not valid YAML ({problem}); fix the syntax") from None
    if raw is None:
        raise UserError(f"{path}: the {what} is empty; write {keys}")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a {what} must be a YAML mapping of {keys}, not a {type(raw).__name__}")
    return raw


def make_dir(path: str | Path, flag: str = "--out") -> Path:
    """Create the output folder a user named with `flag` (and its parents), or say in one line why not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file" if blocker is not None else e.strerror
        raise UserError(f"cannot create {flag} {path}: {why}; pick a folder you can write to") from None
    return path


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
