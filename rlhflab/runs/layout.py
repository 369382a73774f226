"""Names shared by the writers and readers of run and sweep directories, and reading a run's saved config."""

from __future__ import annotations

from pathlib import Path

from rlhflab.config import Config, config_from_dict, read_recipe
from rlhflab.errors import UserError

SWEEP_JSON = "sweep.json"  # a sweep directory's record of its runs and their status


def short_keys(keys: list[str]) -> dict[str, str]:
    """Dotted key → its last part, or the whole key where two keys share a last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k) for k, short in zip(keys, last)}


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run saved (RUN_DIR/config.yaml), for --resume, evaluation and export."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UserError(f"run directory '{run_dir}' not found; pass the --out folder of an earlier run")
    if not path.is_file():
        raise UserError(f"{path} is missing: '{run_dir}' is not a run of rlhflab train, or it stopped before it began; "
                        f"start it with `rlhflab train RECIPE --out {run_dir}`")
    return config_from_dict(read_recipe(path, "run config"), str(path))
