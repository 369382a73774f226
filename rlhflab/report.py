"""The report of a run: plots of its metric stream, its probe evaluation, samples and health notes.

`write_report(RUN_DIR)` reads what the trainer and `rlhflab eval` wrote:

    RUN_DIR/metrics.jsonl      one row per PPO iteration (keys may be missing in some rows)
    RUN_DIR/samples.jsonl      {"iteration", "prompt", "completion", "score", "components"}
    RUN_DIR/config.yaml        the resolved config (shown as is)
    RUN_DIR/eval/eval.json     optional: {"behavior", "groups": {NAME: {"policy": {..}, "reference": {..}}}}
    RUN_DIR/eval/answers.jsonl optional: greedy answers of policy and reference side by side

and writes `RUN_DIR/plots/*.png`, `RUN_DIR/report.html` (one self-contained file, images embedded as
base64) and `RUN_DIR/report.md` (images linked from plots/). The content is built once as a list of
blocks, which two small renderers turn into HTML and markdown.
"""

from __future__ import annotations

import base64
import html
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import yaml

# The Agg canvas is used directly, without pyplot: it renders headless and never switches the backend of
# the calling process (a notebook that imports rlhflab keeps its inline plots).
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rlhflab.errors import UserError
from rlhflab.health import HealthNote, check_health, finite_value

FIGSIZE = (6.0, 3.5)  # inches
DPI = 110
EMA_WEIGHT = 0.5  # light smoothing of the curve lines; raw values are drawn as dots beneath
MIN_POINTS_TO_SMOOTH = 5  # fewer points are joined by a plain line
SAMPLES_PER_TABLE = 6  # first/last iteration samples shown
# seaborn "deep": distinguishable, colour-blind friendlier than matplotlib's default, used by every plot.
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#CCB974", "#64B5CD"]
TWIN_COLOR = "#333333"
REFERENCE_COLOR = "#A0A0A0"
POLICY_COLOR = PALETTE[0]
PLOT_STYLE = {
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 8.5,
    "legend.framealpha": 0.85,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
# Config leaves shown in the header, matched on the last part of their dotted name (e.g. ppo.kl_coef).
HEADER_CONFIG_FIELDS = (
    "name", "critic", "prompts_per_iteration", "samples_per_prompt", "max_new_tokens", "temperature", "spec",
    "advantage_estimator", "kl_coef", "kl_estimator", "adaptive_kl_target", "clip_range", "epochs", "iterations",
    "learning_rate", "seed",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class Run:
    """Everything read from a run directory."""

    name: str
    rows: list[dict]
    samples: list[dict]
    config_text: str
    config: dict
    eval: dict | None
    answers: list[dict]


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file ([] if absent). A cut-off last line (run killed mid-write) is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); fix or remove the line") from err
    return rows


def load_run(run_dir: Path) -> Run:
    """Read a run directory; only metrics.jsonl is required."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise UserError(f"{metrics} not found: pass the directory a `rlhflab train` run wrote")
    config_path, eval_path = run_dir / "config.yaml", run_dir / "eval" / "eval.json"
    config_text = config_path.read_text() if config_path.exists() else ""
    config = yaml.safe_load(config_text) if config_text else {}
    return Run(
        name=run_dir.resolve().name,
        rows=_read_jsonl(metrics),
        samples=_read_jsonl(run_dir / "samples.jsonl"),
        config_text=config_text,
        config=config if isinstance(config, dict) else {},
        eval=json.loads(eval_path.read_text()) if eval_path.exists() else None,
        answers=_read_jsonl(run_dir / "eval" / "answers.jsonl"),
    )


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of one metric over the rows that hold a finite value for it."""
    xs, ys = [], []
    for index, row in enumerate(rows, 1):
        value = finite_value(row, key)
        if value is not None:
            xs.append(row.get("iteration", index))
            ys.append(value)
    return xs, ys


def _last(rows: list[dict], key: str) -> float | None:
    """The metric's last finite value, or None."""
    values = _series(rows, key)[1]
    return values[-1] if values else None


def _fmt(value: object, digits: int = 3) -> str:
    """A table cell: numbers to `digits` significant figures, missing as an en dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


# --------------------------------------------------------------------------------------------- plotting


@dataclass(frozen=True)
class Curve:
    """One metric drawn on a plot."""

    key: str
    label: str


@dataclass(frozen=True)
class CurvePlot:
    """One per-iteration plot: its curves on the left axis and optionally one on a right (twin) axis."""

    name: str  # file stem in plots/
    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    twin: Curve | None = None
    twin_ylabel: str = ""
    ylim: tuple[float, float] | None = None
    zero_line: bool = False
    smooth: bool = True  # off for sparse metrics (eval/* every few iterations), where an average would lag


@dataclass(frozen=True)
class FigureRef:
    """A saved plot and its title (the alt text)."""

    path: Path
    title: str


def _ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing), so the first points are not pulled to 0."""
    smoothed, average = [], 0.0
    for step, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**step))
    return smoothed


def _new_figure() -> tuple[Figure, Axes]:
    """A figure of the report's size on the headless Agg canvas, with one axis.

    Constrained layout keeps a legend placed below the axis inside the figure.
    """
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path, title: str) -> FigureRef:
    fig.savefig(path, dpi=DPI)
    return FigureRef(path, title)


def _draw_series(
    ax: Axes, xs: list, ys: list[float], label: str, color: str, style: str = "-", smooth: bool = True
) -> None:
    """Raw values as faint dots and a smoothed line over them (a plain line with markers if not smoothed)."""
    if not smooth or len(ys) < MIN_POINTS_TO_SMOOTH:
        ax.plot(xs, ys, marker="o", ls=style, color=color, label=label, lw=1.8, ms=4)
        return
    ax.scatter(xs, ys, color=color, alpha=0.35, s=14, linewidths=0)
    ax.plot(xs, _ema(ys), ls=style, color=color, label=label, lw=1.8)


def _legend_below(
    ax: Axes, handles: list, labels: list[str], title: str | None = None, ncol: int | None = None
) -> None:
    """Legend under the x-axis label, so it never hides data; two columns when three long labels would not fit."""
    ncol = ncol or min(len(labels), 3 if sum(map(len, labels)) <= 60 else 2)
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=ncol, frameon=False,
              title=title)


def finish_iteration_axes(ax: Axes, spec) -> None:
    """Zero line, y-limits, title and an integer "PPO iteration" x-axis: shared by run and comparison plots."""
    if spec.zero_line:
        ax.axhline(0, color="black", lw=0.8, alpha=0.6)
    if spec.ylim:
        ax.set_ylim(*spec.ylim)
    ax.set_title(spec.title)
    ax.set_xlabel("PPO iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_curves(spec: CurvePlot, rows: list[dict], plot_dir: Path) -> FigureRef | None:
    """Draw one per-iteration plot from the metric rows; None when none of its metrics was logged."""
    series = [(curve, _series(rows, curve.key)) for curve in spec.curves]
    series = [(curve, xy) for curve, xy in series if xy[1]]
    if not series:
        return None
    fig, ax = _new_figure()
    for index, (curve, (xs, ys)) in enumerate(series):
        _draw_series(ax, xs, ys, curve.label, PALETTE[index % len(PALETTE)], smooth=spec.smooth)
    handles, labels = ax.get_legend_handles_labels()
    twin_xy = _series(rows, spec.twin.key) if spec.twin else ([], [])
    if twin_xy[1]:
        twin = ax.twinx()
        _draw_series(twin, *twin_xy, f"{spec.twin.label} (right axis)", TWIN_COLOR, style="--")
        twin.set_ylabel(spec.twin_ylabel)
        twin.grid(False)
        twin.spines["right"].set_visible(True)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.set_ylabel(spec.ylabel)
    finish_iteration_axes(ax, spec)
    if len(labels) > 1:  # a lone curve is named by the title
        _legend_below(ax, handles, labels)
    return _save(fig, plot_dir / f"{spec.name}.png", spec.title)


def _keys_like(rows: list[dict], prefix: str, suffix: str = "") -> list[str]:
    """Sorted metric keys starting with `prefix` and ending with `suffix` (e.g. reward/<component>)."""
    return sorted({k for row in rows for k in row if k.startswith(prefix) and k.endswith(suffix)})


def _same_series(rows: list[dict], key_a: str, key_b: str) -> bool:
    """Whether two metrics were logged with the same values at the same iterations (and at least once)."""
    (xs_a, ys_a), (xs_b, ys_b) = _series(rows, key_a), _series(rows, key_b)
    same_values = all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(ys_a, ys_b))
    return bool(ys_a) and xs_a == xs_b and same_values


def _kl_plot(rows: list[dict]) -> CurvePlot:
    """KL estimators; the one used in the reward is named on its estimator's line instead of drawn twice."""
    curves = [Curve("objective/kl_k1", "k1 = log-ratio"), Curve("objective/kl_k3", "k3 (always ≥ 0)")]
    for index, curve in enumerate(curves):
        if _same_series(rows, "objective/kl", curve.key):
            curves[index] = Curve(curve.key, f"{curve.label} — used in reward")
            break
    else:
        curves.append(Curve("objective/kl", "used in reward"))
    betas = set(_series(rows, "objective/kl_coef")[1])
    title = "KL to the reference" + (f" (β = {betas.pop():.3g})" if len(betas) == 1 else "")
    twin = Curve("objective/kl_coef", "β (KL coefficient)") if len(betas) > 1 else None
    return CurvePlot("kl", title, "KL (nats per answer)", tuple(curves), twin, "β", zero_line=True)


def curve_plots(rows: list[dict]) -> list[CurvePlot]:
    """The report's per-iteration plots, in display order (reward components and eval groups from the rows)."""
    components = [Curve(k, f"component: {k.removeprefix('reward/')}") for k in _keys_like(rows, "reward/")]
    behaviors = [Curve(k, k.split("/")[1]) for k in _keys_like(rows, "eval/", "/behavior_rate")]
    share = (0.0, 1.05)
    return [
        CurvePlot(
            "reward", "Reward", "reward (mean per answer)",
            (Curve("objective/scores", "task score"), Curve("objective/rlhf_reward", "score − β·KL"), *components),
        ),
        _kl_plot(rows),
        CurvePlot("entropy", "Policy entropy", "entropy (nats per token)", (Curve("objective/entropy", "entropy"),)),
        CurvePlot(
            "response_length", "Response length", "length (tokens)",
            (Curve("rollout/response_length", "mean answer length"),),
        ),
        CurvePlot(
            "eos_rate", "Answers that end with EOS", "share of answers",
            (Curve("rollout/eos_rate", "EOS rate"),), ylim=share,
        ),
        CurvePlot(
            "explained_variance", "Critic explained variance", "explained variance (1 = perfect)",
            (Curve("value/explained_variance", "value head"),), zero_line=True,
        ),
        CurvePlot(
            "clipfrac", "PPO clipping", "share of tokens clipped",
            (Curve("policy/clipfrac", "policy clip fraction"), Curve("value/clipfrac", "value clip fraction")),
            twin=Curve("policy/approxkl", "approx KL"), twin_ylabel="approx KL (nats per token)",
        ),
        CurvePlot(
            "diversity", "Diversity of rollouts", "unique / total n-grams",
            (Curve("diversity/distinct_2", "distinct-2"), Curve("diversity/distinct_1", "distinct-1")), ylim=share,
        ),
        CurvePlot(
            "eval_behavior", "Probe behaviour rate during training", "share of answers with behaviour",
            tuple(behaviors), ylim=share, smooth=False,
        ),
    ]  # fmt: skip


def plot_trajectory(rows: list[dict], plot_dir: Path) -> FigureRef | None:
    """Task score against KL, one dot per iteration coloured by iteration: what each nat of KL bought."""
    points = [
        (row.get("iteration", i), finite_value(row, "objective/kl"), finite_value(row, "objective/scores"))
        for i, row in enumerate(rows, 1)
    ]
    points = [point for point in points if None not in point]
    if not points:
        return None
    iterations, kls, scores = zip(*points)
    fig, ax = _new_figure()
    ax.plot(kls, scores, color=REFERENCE_COLOR, lw=1, zorder=1)
    dots = ax.scatter(kls, scores, c=iterations, cmap="viridis", s=40, edgecolors="white", linewidths=0.6, zorder=2)
    fig.colorbar(dots, ax=ax, label="PPO iteration")
    for label, index in (("start", 0), ("end", -1)):
        ax.annotate(label, (kls[index], scores[index]), xytext=(6, 4), textcoords="offset points", fontsize=9)
    ax.set_title("Reward vs KL trajectory")
    ax.set_xlabel("KL to the reference (nats per answer)")
    ax.set_ylabel("task score (mean per answer)")
    return _save(fig, plot_dir / "reward_vs_kl.png", "Reward vs KL trajectory")


def plot_behavior_bars(evaluation: dict, plot_dir: Path) -> FigureRef | None:
    """Behaviour rate of the reference (before) and the policy (after), side by side per probe group."""
    groups = evaluation.get("groups") or {}
    if not groups:
        return None
    names = list(groups)
    fig, ax = _new_figure()
    width = 0.38
    sides = (("reference", "reference (before)", REFERENCE_COLOR), ("policy", "policy (after)", POLICY_COLOR))
    for offset, (side, label, color) in zip((-width / 2, width / 2), sides):
        rates = [finite_value(groups[name].get(side, {}), "behavior_rate") or 0.0 for name in names]
        bars = ax.bar([i + offset for i in range(len(names))], rates, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    behavior = textwrap.shorten(str(evaluation.get("behavior", "behaviour")), 32, placeholder="…")
    ax.set_title(f"Behaviour rate per probe group ({behavior})")
    ax.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0)
    ax.set_ylabel("share of answers with behaviour")
    ax.set_ylim(0, 1.15)
    # no x-axis label: the group names say it, and rotated names would push it into the legend
    _legend_below(ax, *ax.get_legend_handles_labels())
    return _save(fig, plot_dir / "behavior_by_group.png", "Behaviour rate per probe group")


# ------------------------------------------------------------------------------------ document blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Stats:
    """Label/value tiles (a two-column table in markdown)."""

    items: list[tuple[str, str]]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figures:
    figures: list[FigureRef]


@dataclass
class Notes:
    notes: list[HealthNote]


@dataclass
class Details:
    """Collapsed preformatted text (the config)."""

    summary: str
    text: str


Block = Heading | Text | Stats | Table | Figures | Notes | Details


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)


def _flatten(mapping: dict, prefix: str = "") -> dict[str, object]:
    """Nested config -> {"ppo.kl_coef": 0.05, ...} (lists kept as leaves)."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat


def _header_blocks(run: Run, notes: list[HealthNote]) -> list[Block]:
    """Final metrics and the key config numbers as tiles."""
    rows = run.rows
    total_time = sum(_series(rows, "time/iteration")[1])
    final = [
        ("iterations", _fmt(len(rows))),
        ("final task score", _fmt(_last(rows, "objective/scores"))),
        ("final score − β·KL", _fmt(_last(rows, "objective/rlhf_reward"))),
        ("final KL (nats/answer)", _fmt(_last(rows, "objective/kl"))),
        ("final β", _fmt(_last(rows, "objective/kl_coef"))),
        ("final entropy (nats/token)", _fmt(_last(rows, "objective/entropy"))),
        ("final EOS rate", _fmt(_last(rows, "rollout/eos_rate"))),
        ("final distinct-2", _fmt(_last(rows, "diversity/distinct_2"))),
        ("training time", f"{total_time / 60:.1f} min" if total_time else "–"),
        ("health alarms", str(len(notes))),
    ]
    config = [
        (key, _fmt(value)) for key, value in _flatten(run.config).items()
        if key.rsplit(".", 1)[-1] in HEADER_CONFIG_FIELDS and not isinstance(value, (list, dict))
    ]  # fmt: skip
    blocks: list[Block] = [Stats(final)]
    if config:
        blocks += [Heading("Key settings", 3), Stats(config)]
    return blocks


def _arrow(group: dict, metric: str) -> str:
    """'reference → policy' for one metric of one probe group."""
    before = finite_value(group.get("reference", {}), metric)
    after = finite_value(group.get("policy", {}), metric)
    return f"{_fmt(before)} → {_fmt(after)}"


def _policy_kl(group: dict) -> str:
    """'k1 / k3' of the policy's answers (the reference's KL to itself is 0 by construction)."""
    policy = group.get("policy", {})
    return f"{_fmt(finite_value(policy, 'kl_k1'))} / {_fmt(finite_value(policy, 'kl_k3'))}"


def _eval_blocks(run: Run, bars: FigureRef | None) -> list[Block]:
    """The probe-group table, the behaviour bar chart and the greedy before/after answers per group."""
    evaluation = run.eval or {}
    groups = evaluation.get("groups") or {}
    intro = (
        f"Behaviour measured: `{evaluation.get('behavior', '?')}`. Each cell reads reference → policy; KL is the "
        "policy's (the reference's own KL is 0). NLL is the answers' per-token negative log-likelihood under "
        "the reference model, a fluency proxy (higher = less like the reference's own text)."
    )
    table = Table(
        ["group", "behaviour rate", "reward", "KL k1 / k3 (nats)", "NLL under reference (nats/token)",
         "distinct-2", "length (tokens)"],
        [
            [name, _arrow(g, "behavior_rate"), _arrow(g, "reward_mean"), _policy_kl(g), _arrow(g, "nll_reference"),
             _arrow(g, "distinct_2"), _arrow(g, "length")]
            for name, g in groups.items()
        ],
    )  # fmt: skip
    blocks: list[Block] = [Heading("Probe evaluation"), Text(intro), table]
    if bars:
        blocks.append(Figures([bars]))
    if run.answers:
        blocks += [Heading("Greedy answers before and after", 3)]
        for group in dict.fromkeys(a.get("group", "?") for a in run.answers):
            rows = [
                [a.get("prompt", ""), a.get("reference", ""), _fmt(a.get("reference_reward")),
                 a.get("policy", ""), _fmt(a.get("policy_reward"))]
                for a in run.answers if a.get("group", "?") == group
            ]  # fmt: skip
            blocks += [Heading(group, 4), Table(["prompt", "reference", "reward", "policy", "reward"], rows)]
    return blocks


def _sample_blocks(samples: list[dict]) -> list[Block]:
    """Completions of the first and the last logged iteration, with their scores."""
    iterations = sorted({s.get("iteration", 0) for s in samples})
    blocks: list[Block] = [Heading("Samples")]
    if not iterations:
        return blocks + [Text("No samples were logged.")]
    for iteration in dict.fromkeys((iterations[0], iterations[-1])):
        chosen = [s for s in samples if s.get("iteration", 0) == iteration][:SAMPLES_PER_TABLE]
        rows = [
            [s.get("prompt", ""), s.get("completion", ""), _fmt(s.get("score")),
             ", ".join(f"{k} {_fmt(v)}" for k, v in (s.get("components") or {}).items())]
            for s in chosen
        ]  # fmt: skip
        blocks += [Heading(f"Iteration {iteration}", 3), Table(["prompt", "completion", "score", "components"], rows)]
    return blocks


def build_document(run: Run, curves: list[FigureRef], bars: FigureRef | None, notes: list[HealthNote]) -> Document:
    """The whole report as blocks, in reading order."""
    doc = Document(f"rlhflab report — {run.name}")
    doc.blocks += _header_blocks(run, notes)
    doc.blocks += [Heading("Health"), Notes(notes)]
    doc.blocks += [
        Heading("Training curves"),
        Text("Dots are the raw value of each PPO iteration; lines are an exponential moving average of them."),
        Figures(curves),
    ]
    if run.eval:
        doc.blocks += _eval_blocks(run, bars)
    doc.blocks += _sample_blocks(run.samples)
    if run.config_text:
        doc.blocks += [Heading("Config"), Details("config.yaml (resolved)", run.config_text)]
    return doc


# ------------------------------------------------------------------------------------------ rendering

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       background: #f5f6f8; color: #1f2328; font-size: 15px; line-height: 1.45; }
main { max-width: 1400px; margin: 0 auto; padding: 20px 32px 48px; }
h1 { font-size: 26px; margin: 8px 0 16px; }
h2 { font-size: 20px; border-bottom: 2px solid #d8dee4; padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 17px; margin-top: 24px; } h4 { font-size: 15px; margin: 18px 0 6px; color: #4C72B0; }
code { background: #eaeef2; padding: 1px 5px; border-radius: 4px; }
.stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; }
.stat { background: #fff; border: 1px solid #d8dee4; border-radius: 8px; padding: 8px 12px; }
.stat .label { font-size: 12px; color: #57606a; } .stat .value { font-size: 18px; font-weight: 600;
       overflow-wrap: anywhere; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(470px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #d8dee4; border-radius: 8px; padding: 6px; }
figure img { width: 100%; height: auto; display: block; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 14px; margin: 8px 0; }
th, td { border: 1px solid #d8dee4; padding: 6px 9px; text-align: left; vertical-align: top;
         white-space: pre-wrap; }
td.num { width: 1%; white-space: nowrap; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eef1f4; } tr:nth-child(even) td { background: #fafbfc; }
.note { background: #fff; border: 1px solid #d8dee4; border-left: 5px solid #C44E52; border-radius: 6px;
        padding: 8px 14px; margin: 8px 0; }
.note.ok { border-left-color: #55A868; }
.note .what { font-weight: 600; } .note .why { color: #57606a; }
details { background: #fff; border: 1px solid #d8dee4; border-radius: 6px; padding: 8px 14px; }
summary { cursor: pointer; font-weight: 600; }
pre { font-size: 13px; overflow-x: auto; }
"""


def _inline(text: str) -> str:
    """Escape text for HTML, then turn `code` spans into <code> (the only markup a Text block may hold)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts))


def _html_cell(value: object) -> str:
    """A table cell; numbers get the "num" class so their columns stay narrow and the text columns get the room."""
    text = str(value)
    try:
        float(text)
    except ValueError:
        return f"<td>{html.escape(text)}</td>"
    return f'<td class="num">{text}</td>'


def _html_block(block: Block) -> str:
    esc = html.escape
    if isinstance(block, Heading):
        return f"<h{block.level}>{esc(block.text)}</h{block.level}>"
    if isinstance(block, Text):
        return f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Stats):
        tiles = "".join(
            f'<div class="stat"><div class="label">{esc(k)}</div><div class="value">{esc(v)}</div></div>'
            for k, v in block.items
        )
        return f'<div class="stats">{tiles}</div>'
    if isinstance(block, Table):
        head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Figures):
        images = "".join(
            f'<figure><img src="data:image/png;base64,{base64.b64encode(f.path.read_bytes()).decode()}" '
            f'alt="{esc(f.title)}"></figure>'
            for f in block.figures
        )
        return f'<div class="figures">{images}</div>'
    if isinstance(block, Notes):
        if not block.notes:
            return '<div class="note ok">No alarms: every health check stayed quiet.</div>'
        return "".join(
            f'<div class="note"><div class="what">{esc(n.code)}: {esc(n.message)}</div>'
            f'<div class="why"><b>Likely cause:</b> {esc(n.cause)}</div><div><b>Fix:</b> {esc(n.fix)}</div></div>'
            for n in block.notes
        )
    return f"<details><summary>{esc(block.summary)}</summary><pre>{esc(block.text)}</pre></details>"


def render_html(doc: Document) -> str:
    """One self-contained HTML page: inline CSS, images as base64 data URIs."""
    body = "\n".join(_html_block(block) for block in doc.blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(doc.title)}</title>'
        f"<style>{CSS}</style></head>\n<body><main>\n<h1>{html.escape(doc.title)}</h1>\n{body}\n</main></body></html>\n"
    )


def _md_cell(value: object) -> str:
    """A markdown table cell: HTML-escaped (answers are model text), pipes escaped, newlines as <br>."""
    return html.escape(str(value)).replace("|", "\\|").replace("\n", "<br>")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _md_block(block: Block, base: Path) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Stats):
        return _md_table(["", "value"], [list(item) for item in block.items])
    if isinstance(block, Table):
        return _md_table(block.header, block.rows)
    if isinstance(block, Figures):
        return "\n\n".join(f"![{f.title}]({f.path.relative_to(base).as_posix()})" for f in block.figures)
    if isinstance(block, Notes):
        if not block.notes:
            return "No alarms: every health check stayed quiet."
        return "\n".join(
            f"- **{n.code}**: {n.message}\n  - likely cause: {n.cause}\n  - fix: {n.fix}"
            for n in block.notes
        )
    return f"<details><summary>{block.summary}</summary>\n\n```yaml\n{block.text.rstrip()}\n```\n\n</details>"


def render_markdown(doc: Document, base: Path) -> str:
    """Markdown with images linked relative to `base` (the run directory)."""
    return "\n\n".join([f"# {doc.title}", *(_md_block(block, base) for block in doc.blocks)]) + "\n"


# ----------------------------------------------------------------------------------------------- entry


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write plots/, report.html and report.md into `run_dir`; return (html path, markdown path)."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    with mpl.rc_context(PLOT_STYLE):
        curves = [plot_curves(spec, run.rows, plot_dir) for spec in curve_plots(run.rows)]
        curves.append(plot_trajectory(run.rows, plot_dir))
        bars = plot_behavior_bars(run.eval, plot_dir) if run.eval else None
    doc = build_document(run, [c for c in curves if c], bars, check_health(run.rows))
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    html_path.write_text(render_html(doc), encoding="utf-8")
    md_path.write_text(render_markdown(doc, run_dir), encoding="utf-8")
    return html_path, md_path
