"""Compare runs: curves with bands over seeds, the reward–KL frontier, costs, and a table of final numbers.

    compare(RUN_DIRS, OUT, labels=None)   groups the runs by `labels` (one per run), or by their configs
                                          with the seed left out (the keys that differ name the groups)
    compare_sweep(SWEEP_DIR, OUT)         groups a sweep's runs by their grid values (seeds pooled)

Both write OUT/plots/*.png, OUT/compare.html (one self-contained file, images embedded as base64) and
OUT/compare.md (images linked from plots/). Plots, blocks and renderers are the run report's
(`rlhflab/report.py`); this module only aggregates over runs.

A group's curve is the mean over its runs at each iteration, its band the min–max over them (with 2–3 seeds
a standard deviation says little). "Final" is a run's last iteration; the table's ± is the standard
deviation over the group's runs (sample std, n − 1).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl

from rlhflab.config import PPOConfig, flatten
from rlhflab.errors import UserError
from rlhflab.evaluation.document import (
    Details,
    Document,
    Figures,
    Heading,
    Stats,
    Table,
    Text,
    fmt,
    render_html,
    render_markdown,
)
from rlhflab.evaluation.health import check_health
from rlhflab.evaluation.plots import (
    PALETTE,
    PLOT_STYLE,
    FigureRef,
    finish_iteration_axes,
    legend_below,
    metric_series,
    new_figure,
    save_figure,
)
from rlhflab.evaluation.report import Run, load_run
from rlhflab.files import make_dir
from rlhflab.runs.layout import SWEEP_JSON, short_keys

REWARD, KL, DISTINCT2, ENTROPY = "objective/scores", "objective/kl", "diversity/distinct_2", "objective/entropy"
ADV_VAR, GRAD_NORM = "policy/advantage_var", "policy/grad_norm"
TIME_ITER, TIME_ROLLOUT, TIME_UPDATE = "time/iteration", "time/rollout", "time/update"
IGNORED_CONFIG_KEYS = ("train.seed", "log.run_name")  # never what tells two groups apart
SPREAD_FOR_SYMLOG = 20  # KL axes go symlog when one group's KL is this many times another's (β = 0 vs β > 0)
BAND_ALPHA = 0.18
SAMPLES_PER_RUN = 2  # completions of the last iteration shown per run
MAX_LEGEND_COLUMNS = 5
ROLLOUT_COLOR, UPDATE_COLOR = "#B5C3D6", "#5F6F86"  # neutral: the palette's colours name groups elsewhere


@dataclass
class RunData:
    """One run's metric rows and samples, with its group and seed."""

    dir: Path
    group: str
    seed: int | None
    rows: list[dict]
    samples: list[dict]
    whitened: bool | None  # ppo.whiten_advantages, if the run saved its config


@dataclass
class Group:
    label: str
    runs: list[RunData]


@dataclass(frozen=True)
class BandPlot:
    """One per-iteration plot: for each group the mean over its runs and a min–max band."""

    name: str
    title: str
    ylabel: str
    key: str
    ylim: tuple[float, float] | None = None
    zero_line: bool = False
    symlog_if_spread: bool = False


BAND_PLOTS = (
    BandPlot("reward", "Task reward", "score (mean per answer)", REWARD),
    BandPlot("kl", "KL to the reference", "KL (nats per answer)", KL, zero_line=True, symlog_if_spread=True),
    BandPlot("distinct_2", "Diversity of rollouts (distinct-2)", "unique / total bigrams", DISTINCT2, ylim=(0, 1.05)),
    BandPlot("entropy", "Policy entropy", "entropy (nats per token)", ENTROPY),
    BandPlot("advantage_var", "Advantage variance", "variance over answer tokens", ADV_VAR),
    BandPlot("grad_norm", "Policy gradient norm (before clipping)", "L2 norm", GRAD_NORM),
)


# ------------------------------------------------------------------------------------------------ loading


def _value_text(value: object) -> str:
    """A config value in a group label: YAML spelling for true/false/null, exact floats."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return repr(value) if isinstance(value, float) else str(value)


def _label(settings: dict[str, object]) -> str:
    """`kl_coef=0.05, lr=0.001` (short keys) — or `all runs` when nothing tells the groups apart."""
    short = short_keys(list(settings))
    return ", ".join(f"{short[k]}={_value_text(v)}" for k, v in settings.items()) or "all runs"


def _read_run(run_dir: Path, group: str, run: Run | None = None) -> RunData:
    run = run or load_run(Path(run_dir))
    seed = (run.config.get("train") or {}).get("seed")
    ppo = run.config.get("ppo") or {}
    whitened = ppo.get("whiten_advantages")
    if whitened is None and "advantage_estimator" in ppo:  # the default, which depends on the estimator
        whitened = PPOConfig(advantage_estimator=ppo["advantage_estimator"]).whitens_advantages
    return RunData(Path(run_dir), group, seed, run.rows, run.samples, whitened)


def _auto_labels(runs: list[Run]) -> list[str]:
    """Group labels from the config keys that differ between the runs (seed and run name left out)."""
    configs = [flatten(run.config) for run in runs]
    keys = list(dict.fromkeys(k for c in configs for k in c if k not in IGNORED_CONFIG_KEYS))
    differing = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    return [_label({k: c.get(k) for k in differing}) for c in configs]


def _group(runs: list[RunData]) -> list[Group]:
    """Runs grouped by label, groups in order of first appearance."""
    groups: dict[str, Group] = {}
    for run in runs:
        groups.setdefault(run.group, Group(run.group, [])).runs.append(run)
    return list(groups.values())


def sweep_run_dirs(sweep_dir: str | Path) -> list[tuple[Path, str]]:
    """(run directory, group label) of each run of a sweep that has logged at least one iteration."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / SWEEP_JSON
    if not path.is_file():
        raise UserError(f"{path} not found: pass the --out folder of `rlhflab sweep`")
    try:
        record = json.loads(path.read_text())
        entries = record["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a sweep record ({err}); run the sweep again to rewrite it") from None
    found = [(sweep_dir / e["dir"], _label(e.get("overrides") or {})) for e in entries]
    found = [(d, label) for d, label in found if (d / "metrics.jsonl").is_file()]
    if not found:
        raise UserError(f"no run of {sweep_dir} has logged an iteration yet; run the sweep first")
    return found


# ---------------------------------------------------------------------------------------------- numbers


def _band(runs: list[RunData], key: str) -> tuple[list, list[float], list[float], list[float]]:
    """(iterations, mean, min, max) of a metric over the runs that logged it at each iteration."""
    by_iteration: dict[int, list[float]] = {}
    for run in runs:
        for x, y in zip(*metric_series(run.rows, key)):
            by_iteration.setdefault(x, []).append(y)
    xs = sorted(by_iteration)
    values = [by_iteration[x] for x in xs]
    return xs, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def _final(run: RunData, key: str) -> float | None:
    values = metric_series(run.rows, key)[1]
    return values[-1] if values else None


def _mean_of(run: RunData, key: str) -> float | None:
    values = metric_series(run.rows, key)[1]
    return statistics.fmean(values) if values else None


def _distinct2_change(run: RunData) -> float | None:
    """Change of distinct-2 from the first to the last iteration, in % of the first."""
    values = metric_series(run.rows, DISTINCT2)[1]
    return 100 * (values[-1] - values[0]) / values[0] if values and values[0] > 0 else None


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _mean_std(values: list[float | None], digits: int = 3, suffix: str = "") -> str:
    """`mean ± std` over the runs that have a value (`mean` alone for one run, `–` for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{fmt(values[0], digits)}{suffix}"
    return f"{fmt(statistics.fmean(values), digits)} ± {fmt(statistics.stdev(values), 2)}{suffix}"


# --------------------------------------------------------------------------------------------- plotting


def _legend_parts(groups: list[Group]) -> tuple[str | None, list[str]]:
    """Legend title and entries: `kl_coef` over `0`, `0.05`, ... when every group varies the same single key."""
    parts = [g.label.split("=") for g in groups]
    if all(len(p) == 2 and ", " not in g.label for p, g in zip(parts, groups)) and len({p[0] for p in parts}) == 1:
        return parts[0][0], [p[1] for p in parts]
    return None, [g.label for g in groups]


def _legend(ax, groups: list[Group], handles: list) -> None:
    """One legend entry per group, below the plot; one row when the entries are short."""
    title, labels = _legend_parts(groups)
    ncol = len(labels) if len(labels) <= MAX_LEGEND_COLUMNS and sum(map(len, labels)) <= 40 else None
    legend_below(ax, handles, labels, title=title, ncol=ncol)


def _spread(values_per_group: list[list[float]]) -> bool:
    """Whether one group's values dwarf another's (then a linear axis would flatten all but one)."""
    tops = [max(abs(v) for v in values) for values in values_per_group if values]
    return len(tops) > 1 and max(tops) > 1 and max(tops) > SPREAD_FOR_SYMLOG * max(min(tops), 0.05)


def plot_band(spec: BandPlot, groups: list[Group], plot_dir: Path) -> FigureRef | None:
    """Mean line and min–max band per group for one metric; None when no run logged it."""
    bands = [_band(g.runs, spec.key) for g in groups]
    if not any(b[0] for b in bands):
        return None
    fig, ax = new_figure()
    handles = []
    for index, (group, (xs, mean, lo, hi)) in enumerate(zip(groups, bands)):
        color = PALETTE[index % len(PALETTE)]
        if not xs:
            handles.append(ax.plot([], [], color=color, lw=1.8)[0])
            continue
        if len(group.runs) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=BAND_ALPHA, linewidth=0)
        handles.append(ax.plot(xs, mean, color=color, lw=1.8, marker="o" if len(xs) <= 30 else None, ms=3)[0])
    if spec.symlog_if_spread and _spread([b[3] for b in bands]):
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylabel(f"{spec.ylabel} — symlog scale")
    else:
        ax.set_ylabel(spec.ylabel)
    finish_iteration_axes(ax, spec)
    _legend(ax, groups, handles)
    return save_figure(fig, plot_dir / f"{spec.name}.png", spec.title)


def plot_frontier(groups: list[Group], plot_dir: Path) -> FigureRef | None:
    """Task score against KL: each run's last iteration as a dot, each group's mean trajectory as a line."""
    if not any(metric_series(r.rows, KL)[1] for g in groups for r in g.runs):
        return None
    fig, ax = new_figure()
    handles, all_kls = [], []
    for index, group in enumerate(groups):
        color = PALETTE[index % len(PALETTE)]
        kl_x, kl_mean, *_ = _band(group.runs, KL)
        score_x, score_mean, *_ = _band(group.runs, REWARD)
        score_at = dict(zip(score_x, score_mean))
        trajectory = [(k, score_at[x]) for x, k in zip(kl_x, kl_mean) if x in score_at]
        if trajectory:
            ax.plot(*zip(*trajectory), color=color, lw=1.2, alpha=0.55, marker=".", ms=4, zorder=1)
        ends = [(_final(r, KL), _final(r, REWARD)) for r in group.runs]
        ends = [e for e in ends if None not in e]
        if ends:
            ax.scatter(*zip(*ends), color=color, s=60, edgecolors="white", linewidths=0.8, zorder=3)
        all_kls.append([k for k, _ in trajectory] + [k for k, _ in ends])
        handles.append(ax.plot([], [], color=color, marker="o", ms=7, lw=1.2)[0])
    if _spread(all_kls):
        ax.set_xscale("symlog", linthresh=1)
    ax.axvline(0, color="black", lw=0.8, alpha=0.4)
    ax.set_title("Reward vs KL (dots: end of each run)")
    ax.set_xlabel("KL to the reference (nats per answer)")
    ax.set_ylabel("task score (mean per answer)")
    _legend(ax, groups, handles)
    return save_figure(fig, plot_dir / "reward_vs_kl.png", "Reward vs KL")


def plot_time(groups: list[Group], plot_dir: Path) -> FigureRef | None:
    """Seconds per iteration per group: rollout (stages 1–4) and update (stage 5) stacked, one dot per run."""
    totals = [[_mean_of(r, TIME_ITER) for r in g.runs] for g in groups]
    if not any(v is not None for t in totals for v in t):
        return None
    fig, ax = new_figure()
    positions = range(len(groups))
    rollout = [_mean([_mean_of(r, TIME_ROLLOUT) for r in g.runs]) for g in groups]
    update = [_mean([_mean_of(r, TIME_UPDATE) for r in g.runs]) for g in groups]
    if all(v is not None for v in rollout + update):
        ax.bar(positions, rollout, 0.6, color=ROLLOUT_COLOR, label="rollout (stages 1–4)")
        ax.bar(positions, update, 0.6, bottom=rollout, color=UPDATE_COLOR, label="update (stage 5)")
    else:
        ax.bar(positions, [_mean(t) or 0.0 for t in totals], 0.6, color=UPDATE_COLOR, label="iteration")
    for position, values in zip(positions, totals):
        values = [v for v in values if v is not None]
        ax.scatter([position] * len(values), values, color="black", s=16, zorder=3,
                   label="each run" if position == 0 else None)
    title, entries = _legend_parts(groups)
    long_names = sum(map(len, entries)) > 40
    ax.set_xticks(list(positions), entries, rotation=20 if long_names else 0, ha="right" if long_names else "center")
    ax.set_xlabel(title or "group")
    ax.set_ylabel("seconds per iteration (mean)")
    ax.set_title("Seconds per iteration")
    handles, labels = ax.get_legend_handles_labels()
    legend_below(ax, handles, labels, ncol=len(labels))
    return save_figure(fig, plot_dir / "seconds_per_iteration.png", "Seconds per iteration")


# --------------------------------------------------------------------------------------------- document


def _group_table(groups: list[Group]) -> Table:
    header = ["group", "runs", "iterations", "final reward", "final KL (nats)", "final distinct-2",
              "distinct-2 change from iteration 1", "final entropy (nats/token)", "s / iteration"]
    rows = []
    for g in groups:
        lengths = sorted({len(r.rows) for r in g.runs})
        rows.append([
            g.label, str(len(g.runs)), "–".join(map(str, dict.fromkeys((lengths[0], lengths[-1])))),
            _mean_std([_final(r, REWARD) for r in g.runs]),
            _mean_std([_final(r, KL) for r in g.runs]),
            _mean_std([_final(r, DISTINCT2) for r in g.runs]),
            _mean_std([_distinct2_change(r) for r in g.runs], suffix=" %"),
            _mean_std([_final(r, ENTROPY) for r in g.runs]),
            _mean_std([_mean_of(r, TIME_ITER) for r in g.runs]),
        ])  # fmt: skip
    return Table(header, rows)


def _run_table(groups: list[Group]) -> Table:
    header = ["run", "group", "seed", "iterations", "final reward", "final KL", "final distinct-2",
              "distinct-2 change", "final entropy", "s / iteration", "health alarms"]
    rows = []
    for g in groups:
        for r in g.runs:
            change = _distinct2_change(r)
            alarms = ", ".join(sorted({n.code for n in check_health(r.rows)})) or "none"
            rows.append([
                r.dir.name, g.label, fmt(r.seed), str(len(r.rows)), fmt(_final(r, REWARD)), fmt(_final(r, KL)),
                fmt(_final(r, DISTINCT2)), "–" if change is None else f"{change:+.1f} %", fmt(_final(r, ENTROPY)),
                fmt(_mean_of(r, TIME_ITER)), alarms,
            ])  # fmt: skip
    return Table(header, rows)


def _sample_table(groups: list[Group]) -> Table:
    rows = []
    for g in groups:
        for r in g.runs:
            if not r.samples:
                continue
            last = max(s.get("iteration", 0) for s in r.samples)
            for s in [s for s in r.samples if s.get("iteration", 0) == last][:SAMPLES_PER_RUN]:
                rows.append([g.label, r.dir.name, str(last), s.get("prompt", ""), s.get("completion", ""),
                             fmt(s.get("score"))])
    return Table(["group", "run", "iteration", "prompt", "completion", "score"], rows)


EXPLAIN = (
    "Lines are the mean over a group's runs (seeds) at each iteration; bands span the lowest to the highest "
    "run. Final numbers are each run's last iteration; ± is the standard deviation over the group's runs. "
    "The reward is `objective/scores` (before KL and normalisation), the KL `objective/kl` (the estimator in "
    "the penalty), distinct-2 is over each iteration's rollouts; s / iteration is the mean of `time/iteration`."
)


def build_compare_document(title: str, groups: list[Group], figures: list[FigureRef],
                           setup: list[tuple[str, str]], source_text: str | None = None) -> Document:
    doc = Document(title)
    runs = [r for g in groups for r in g.runs]
    stats = [("runs", str(len(runs))), ("groups", str(len(groups))), *setup]
    doc.blocks += [Stats(stats), Heading("Final numbers"), Text(EXPLAIN), _group_table(groups)]
    doc.blocks += [Heading("Curves"), Figures(figures)]
    whitening = {r.whitened for r in runs}
    if whitening == {True}:
        doc.blocks.append(Text(
            "Advantages were whitened (`ppo.whiten_advantages: true`) in every run, so their variance is 1 by "
            "construction; set it to false to compare the variance of the estimators themselves."))
    doc.blocks += [Heading("Runs"), _run_table(groups)]
    samples = _sample_table(groups)
    if samples.rows:
        doc.blocks += [Heading("Samples at the last iteration"), samples]
    if source_text:
        doc.blocks += [Heading("Sweep"), Details("sweep file", source_text)]
    return doc


def _write(groups: list[Group], out_dir: Path, title: str, setup: list[tuple[str, str]],
           source_text: str | None = None) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    plot_dir = make_dir(out_dir / "plots")
    with mpl.rc_context(PLOT_STYLE):
        figures = [plot_band(spec, groups, plot_dir) for spec in BAND_PLOTS]
        figures.insert(2, plot_frontier(groups, plot_dir))
        figures.append(plot_time(groups, plot_dir))
    doc = build_compare_document(title, groups, [f for f in figures if f], setup, source_text)
    html_path, md_path = out_dir / "compare.html", out_dir / "compare.md"
    html_path.write_text(render_html(doc), encoding="utf-8")
    md_path.write_text(render_markdown(doc, out_dir), encoding="utf-8")
    return html_path, md_path


# ------------------------------------------------------------------------------------------------ entry


def compare(run_dirs: list[str | Path], out_dir: str | Path, labels: list[str] | None = None) -> tuple[Path, Path]:
    """Compare run directories; runs sharing a label (default: the same config but the seed) form a group.

    Returns (compare.html, compare.md) in `out_dir`.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise UserError("give at least one run directory (or --sweep SWEEP_DIR)")
    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"{len(labels)} labels for {len(run_dirs)} run directories; give one label per run")
    for run_dir in run_dirs:
        if not (run_dir / "metrics.jsonl").is_file():
            raise UserError(f"{run_dir / 'metrics.jsonl'} not found: pass directories written by `rlhflab train`")
    loaded = [load_run(d) for d in run_dirs]
    labels = labels or (_auto_labels(loaded) if len(loaded) > 1 else [run_dirs[0].resolve().name])
    groups = _group([_read_run(d, label, run) for d, label, run in zip(run_dirs, labels, loaded)])
    return _write(groups, Path(out_dir), f"rlhflab comparison — {len(run_dirs)} runs", [])


def compare_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Compare the runs of a sweep, grouped by grid values (default out_dir: SWEEP_DIR/compare)."""
    sweep_dir = Path(sweep_dir)
    found = sweep_run_dirs(sweep_dir)
    record = json.loads((sweep_dir / SWEEP_JSON).read_text())
    groups = _group([_read_run(d, label) for d, label in found])
    source = Path(record.get("sweep", ""))
    setup = [("sweep", source.name or "?"), ("recipe", Path(record.get("recipe", "?")).name),
             ("seeds", ", ".join(map(str, record.get("seeds", [])))),
             ("finished runs", f"{sum(e.get('status') == 'done' for e in record['runs'])} of {len(record['runs'])}")]
    source_text = source.read_text() if source.is_file() else json.dumps(
        {k: record.get(k) for k in ("recipe", "grid", "seeds", "set")}, indent=2)
    out = Path(out_dir) if out_dir is not None else sweep_dir / "compare"
    return _write(groups, out, f"rlhflab comparison — {sweep_dir.resolve().name}", setup, source_text)
