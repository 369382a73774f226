"""Sweeps: one base recipe, a grid of overrides and a list of seeds, run one after another.

A sweep file (YAML) reads:

    recipe: ../recipes/positive_reviews.yaml   # relative to the sweep file
    grid:                                      # every combination of these values is run ...
      ppo.kl_coef: [0, 0.05]
    seeds: [0, 1]                              # ... once per seed (train.seed)
    set:                                       # overrides applied to every run
      train.iterations: 12

`run_sweep(SWEEP.yaml, OUT)` writes one run directory per (combination, seed), named after its grid values
and seed (`OUT/kl_coef=0.05__seed=1`), seeds outermost so a half-finished sweep already holds every
combination once. Every combination is validated before the first run starts. A run is finished when its
directory holds `DONE` (written after `pipelines.train` returns: metrics, checkpoint, report and all);
re-running a sweep skips finished runs, resumes an unfinished one from its latest checkpoint and restarts
one that has none. A run is identified by its name only: edit the sweep file's values, not the meaning of a
name, or use a fresh OUT. `OUT/sweep.json` lists every run with its directory (relative to OUT), overrides,
seed and status (`pending`, `running`, `done`, `failed`), rewritten whenever a status changes.
"""

from __future__ import annotations

import fcntl
import gc
import itertools
import json
import re
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlhflab.config import Config, flatten, load_config, validated
from rlhflab.errors import Stopped, UserError
from rlhflab.files import make_dir, read_yaml, write_json_atomic
from rlhflab.runs.checkpoint import latest_checkpoint
from rlhflab.runs.layout import SWEEP_JSON, short_keys
from rlhflab.runs.stopping import StopRequests
from rlhflab.runs.tracking import read_jsonl

DONE = "DONE"  # marker file of a finished run
LOCK = ".sweep.lock"
SEED_KEY = "train.seed"


class Sweep(BaseModel):
    """A sweep file: a base recipe, a grid of overrides (their cartesian product) and seeds."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    recipe: str
    """Base recipe (YAML), relative to the sweep file."""
    grid: dict[str, list[Any]] = {}
    """Dotted config key → values to try; every combination of the values is one run per seed."""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    """Seeds (`train.seed`); each grid combination runs once per seed."""
    set: dict[str, Any] = {}
    """Overrides applied to every run (dotted keys or nested sections), before the grid values."""

    @field_validator("grid")
    @classmethod
    def _values_listed(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid key '{key}' has no values; list at least one")
            names = [format_value(v) for v in values]
            if len(set(names)) < len(names):
                raise ValueError(f"grid key '{key}' lists a value twice (or two values with the same name): {values}")
        return grid

    @field_validator("seeds")
    @classmethod
    def _seeds_unique(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) < len(seeds):
            raise ValueError(f"seeds lists a seed twice: {seeds}")
        return seeds


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its directory name, its grid values, its seed and its validated config."""

    name: str
    overrides: dict[str, Any]
    seed: int
    config: Config


# ----------------------------------------------------------------------------------------------- loading


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file; unknown keys and malformed values are UserErrors naming them."""
    path = Path(path)
    raw = read_yaml(path, "sweep file", "pass a sweep file like sweeps/kl_ablation.yaml",
                    "recipe:, grid:, seeds:, set:")
    sweep = validated(Sweep, raw, str(path))
    settings = flatten(sweep.set)
    if SEED_KEY in sweep.grid or SEED_KEY in settings:
        raise UserError(f"{path}: set seeds with `seeds: [...]`, not with '{SEED_KEY}' in grid or set")
    both = sorted(set(sweep.grid) & set(settings))
    if both:
        raise UserError(f"{path}: '{both[0]}' is in both grid and set; keep it in one of them")
    return sweep


def format_value(value: Any) -> str:
    """A grid value as it appears in a run name: exact (repr of floats), YAML spelling of true/false/null."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    text = repr(value) if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._+,-]", "-", text)


def run_name(overrides: dict[str, Any], seed: int) -> str:
    """`kl_coef=0.05__seed=1`: the grid values (short keys, sweep order) and the seed."""
    short = short_keys(list(overrides))
    return "__".join([f"{short[k]}={format_value(v)}" for k, v in overrides.items()] + [f"seed={seed}"])


def _as_override(key: str, value: Any) -> str:
    """`key=value` for config.apply_overrides, the value spelled in YAML so it parses back to itself."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True)
    return f"{key}={text.removesuffix('...' + chr(10)).strip()}"


def plan_runs(path: str | Path) -> tuple[Sweep, list[PlannedRun]]:
    """Every run of a sweep with its config, all validated: any bad key or value fails here, before a run."""
    path = Path(path)
    sweep = load_sweep(path)
    recipe = (path.parent / sweep.recipe).resolve()
    if not recipe.is_file():
        raise UserError(f"{path}: recipe '{sweep.recipe}' not found (looked for {recipe}); "
                        "the recipe path is relative to the sweep file")
    common = [_as_override(k, v) for k, v in flatten(sweep.set).items()]
    keys = list(sweep.grid)
    runs: list[PlannedRun] = []
    for seed in sweep.seeds:
        for values in itertools.product(*(sweep.grid[k] for k in keys)):
            overrides = dict(zip(keys, values))
            name = run_name(overrides, seed)
            grid_set = [_as_override(k, v) for k, v in overrides.items()]
            try:
                config = load_config(recipe, [*common, *grid_set, _as_override(SEED_KEY, seed)])
            except UserError as err:
                raise UserError(f"{path}: run '{name}': {err}") from None
            runs.append(PlannedRun(name, overrides, seed, config))
    return sweep, runs


# ----------------------------------------------------------------------------------------------- running


def run_status(run_dir: Path) -> str:
    """`done` (DONE marker), `resume` (unfinished, with a checkpoint), `restart` (unfinished, no checkpoint) or
    `new` (no directory)."""
    if (run_dir / DONE).is_file():
        return "done"
    if not run_dir.exists():
        return "new"
    try:
        checkpoint = latest_checkpoint(run_dir)
    except UserError:  # `latest` names an incomplete checkpoint
        checkpoint = None
    return "resume" if checkpoint is not None and (run_dir / "config.yaml").is_file() else "restart"


def _last_row(run_dir: Path) -> dict:

    rows = read_jsonl(run_dir / "metrics.jsonl")
    return rows[-1] if rows else {}


def _entry(out: Path, run: PlannedRun) -> dict:
    """The run's line in sweep.json as found on disk (a finished run keeps the seconds its DONE recorded)."""
    entry = {"dir": run.name, "overrides": run.overrides, "seed": run.seed, "status": "pending"}
    if run_status(out / run.name) == "done":
        try:
            seconds = json.loads((out / run.name / DONE).read_text()).get("seconds")
        except (json.JSONDecodeError, AttributeError):
            seconds = None
        entry.update(status="done", seconds=seconds)
    return entry


def run_sweep(sweep_yaml: str | Path, out_dir: str | Path, echo: Callable[[str], None] | None = None) -> dict:
    """Run every (combination, seed) of a sweep in turn into `out_dir`; skip finished runs; return sweep.json.

    `echo` receives one line per run started and finished (None: silent). A run that raises is marked
    `failed` (traceback in RUN/error.log) and the next one starts; a UserError listing the failed runs is
    raised at the end. SIGTERM / Ctrl-C stop the running training at its next iteration (checkpointed) and the
    sweep after it (exit 143 / 130); re-running picks up where it stopped.
    """
    from rlhflab.pipelines.train import train

    say = echo or (lambda line: None)
    sweep_path = Path(sweep_yaml)
    sweep, runs = plan_runs(sweep_path)  # every config checked before anything runs
    out = make_dir(out_dir)
    with open(out / LOCK, "w") as lock, StopRequests("the current run's iteration") as stop:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `rlhflab sweep` is running in {out}; wait for it or pick another --out") from None
        record = {
            "sweep": str(sweep_path.resolve()),
            "recipe": str((sweep_path.parent / sweep.recipe).resolve()),
            "grid": sweep.grid,
            "seeds": sweep.seeds,
            "set": sweep.set,
            "runs": [_entry(out, r) for r in runs],
        }
        write_json_atomic(out / SWEEP_JSON, record)
        failed = []
        rerun = "run the same `rlhflab sweep` again to continue the sweep"
        for index, (run, entry) in enumerate(zip(runs, record["runs"]), 1):
            if stop.requested:  # arrived between runs: nothing is lost by not starting the next one
                raise Stopped(f"stopped by {stop.signal.name} before run {index} of {len(runs)}", stop.exit_code, rerun)
            run_dir = out / run.name
            state = run_status(run_dir)
            tag = f"[{index}/{len(runs)}] {run.name}"
            if state == "done":
                say(f"{tag}: finished earlier, skipped")
                continue
            if state == "restart":
                shutil.rmtree(run_dir)  # unfinished and nothing to resume from: start over
            say(f"{tag}: {'resuming from its latest checkpoint' if state == 'resume' else 'training'} "
                f"({run.config.train.iterations} iterations)")
            entry["status"] = "running"
            entry.pop("error", None)
            write_json_atomic(out / SWEEP_JSON, record)
            started = time.perf_counter()
            try:
                train(run.config, run_dir, resume=state == "resume", quiet=True)
            except Stopped as stopped:  # checkpointed by train: the sweep stops here and resumes this run
                entry["status"] = "stopped"
                write_json_atomic(out / SWEEP_JSON, record)
                raise Stopped(f"{tag}: {stopped.what}", stopped.exit_code, rerun) from None
            except Exception as err:  # noqa: BLE001 — one broken run must not stop the others
                (run_dir / "error.log").parent.mkdir(parents=True, exist_ok=True)
                (run_dir / "error.log").write_text(traceback.format_exc())
                entry.update(status="failed", error=str(err).splitlines()[0] if str(err) else type(err).__name__)
                failed.append(run.name)
                say(f"{tag}: FAILED: {entry['error']} (traceback in {run_dir / 'error.log'})")
            else:
                seconds = time.perf_counter() - started
                finished = time.strftime("%Y-%m-%dT%H:%M:%S")
                write_json_atomic(run_dir / DONE, {"seconds": round(seconds, 1), "finished": finished})
                entry.update(status="done", seconds=round(seconds, 1))
                last = _last_row(run_dir)
                nan = float("nan")
                say(f"{tag}: done in {seconds / 60:.1f} min — reward {last.get('objective/scores', nan):.3f}, "
                    f"KL {last.get('objective/kl', nan):.2f} nats, "
                    f"distinct-2 {last.get('diversity/distinct_2', nan):.3f}")
            write_json_atomic(out / SWEEP_JSON, record)
            gc.collect()  # free the last run's models before the next one loads
    if failed:
        raise UserError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); see error.log in each; "
                        "run the sweep again to retry them")
    return record
