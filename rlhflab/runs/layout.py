"""Names shared by the writers and readers of run and sweep directories."""

from __future__ import annotations

SWEEP_JSON = "sweep.json"  # a sweep directory's record of its runs and their status


def short_keys(keys: list[str]) -> dict[str, str]:
    """Dotted key → its last part, or the whole key where two keys share a last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k) for k, short in zip(keys, last)}
