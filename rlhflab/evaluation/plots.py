"""Plot helpers shared by a run's report and the comparison of runs: one style, one figure size, the
headless Agg canvas, smoothed per-iteration curves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The Agg canvas is used directly, without pyplot: it renders headless and never switches the backend of
# the calling process (a notebook that imports rlhflab keeps its inline plots).
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rlhflab.evaluation.health import finite_value

FIGSIZE = (6.0, 3.5)  # inches
DPI = 110
EMA_WEIGHT = 0.5  # light smoothing of the curve lines; raw values are drawn as dots beneath
MIN_POINTS_TO_SMOOTH = 5  # fewer points are joined by a plain line
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


def metric_series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(iterations, values) of one metric over the rows that hold a finite value for it."""
    xs, ys = [], []
    for index, row in enumerate(rows, 1):
        value = finite_value(row, key)
        if value is not None:
            xs.append(row.get("iteration", index))
            ys.append(value)
    return xs, ys



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


def ema(values: list[float], weight: float = EMA_WEIGHT) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing), so the first points are not pulled to 0."""
    smoothed, average = [], 0.0
    for step, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**step))
    return smoothed


def new_figure() -> tuple[Figure, Axes]:
    """A figure of the report's size on the headless Agg canvas, with one axis.

    Constrained layout keeps a legend placed below the axis inside the figure.
    """
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_figure(fig: Figure, path: Path, title: str) -> FigureRef:
    fig.savefig(path, dpi=DPI)
    return FigureRef(path, title)


def draw_series(
    ax: Axes, xs: list, ys: list[float], label: str, color: str, style: str = "-", smooth: bool = True
) -> None:
    """Raw values as faint dots and a smoothed line over them (a plain line with markers if not smoothed)."""
    if not smooth or len(ys) < MIN_POINTS_TO_SMOOTH:
        ax.plot(xs, ys, marker="o", ls=style, color=color, label=label, lw=1.8, ms=4)
        return
    ax.scatter(xs, ys, color=color, alpha=0.35, s=14, linewidths=0)
    ax.plot(xs, ema(ys), ls=style, color=color, label=label, lw=1.8)


def draw_grouped_bars(ax: Axes, names: list[str], series: list[tuple[str, list[float], str]]) -> None:
    """Bars of several (label, values, colour) series side by side at each name, each bar labelled with its value:
    reference and policy per probe group, or the reference and several runs."""
    width = 0.76 / len(series)
    for k, (label, values, color) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=8 if len(series) < 3 else 6.5, padding=2)


def legend_below(
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
    series = [(curve, metric_series(rows, curve.key)) for curve in spec.curves]
    series = [(curve, xy) for curve, xy in series if xy[1]]
    if not series:
        return None
    fig, ax = new_figure()
    for index, (curve, (xs, ys)) in enumerate(series):
        draw_series(ax, xs, ys, curve.label, PALETTE[index % len(PALETTE)], smooth=spec.smooth)
    handles, labels = ax.get_legend_handles_labels()
    twin_xy = metric_series(rows, spec.twin.key) if spec.twin else ([], [])
    if twin_xy[1]:
        twin = ax.twinx()
        draw_series(twin, *twin_xy, f"{spec.twin.label} (right axis)", TWIN_COLOR, style="--")
        twin.set_ylabel(spec.twin_ylabel)
        twin.grid(False)
        twin.spines["right"].set_visible(True)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.set_ylabel(spec.ylabel)
    finish_iteration_axes(ax, spec)
    if len(labels) > 1:  # a lone curve is named by the title
        legend_below(ax, handles, labels)
    return save_figure(fig, plot_dir / f"{spec.name}.png", spec.title)


