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

import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import yaml

from rlhflab.config import flatten
from rlhflab.errors import UserError
from rlhflab.evaluation.document import (
    Block,
    Details,
    Document,
    Figures,
    Heading,
    Notes,
    Stats,
    Table,
    Text,
    fmt,
    render_html,
    render_markdown,
)
from rlhflab.evaluation.health import HealthNote, check_evaluation, check_health, finite_value, unchanged_probe_groups
from rlhflab.evaluation.plots import (
    PLOT_STYLE,
    POLICY_COLOR,
    REFERENCE_COLOR,
    Curve,
    CurvePlot,
    FigureRef,
    draw_grouped_bars,
    legend_below,
    metric_series,
    new_figure,
    plot_curves,
    save_figure,
)
from rlhflab.runs.tracking import read_jsonl

SAMPLES_PER_TABLE = 6  # first/last iteration samples shown
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
        rows=read_jsonl(metrics),
        samples=read_jsonl(run_dir / "samples.jsonl"),
        config_text=config_text,
        config=config if isinstance(config, dict) else {},
        eval=json.loads(eval_path.read_text()) if eval_path.exists() else None,
        answers=read_jsonl(run_dir / "eval" / "answers.jsonl"),
    )


def last_value(rows: list[dict], key: str) -> float | None:
    """The metric's last finite value, or None."""
    values = metric_series(rows, key)[1]
    return values[-1] if values else None


def _keys_like(rows: list[dict], prefix: str, suffix: str = "") -> list[str]:
    """Sorted metric keys starting with `prefix` and ending with `suffix` (e.g. reward/<component>)."""
    return sorted({k for row in rows for k in row if k.startswith(prefix) and k.endswith(suffix)})


def _same_series(rows: list[dict], key_a: str, key_b: str) -> bool:
    """Whether two metrics were logged with the same values at the same iterations (and at least once)."""
    (xs_a, ys_a), (xs_b, ys_b) = metric_series(rows, key_a), metric_series(rows, key_b)
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
    betas = set(metric_series(rows, "objective/kl_coef")[1])
    title = "KL to the reference" + (f" (β = {betas.pop():.3g})" if len(betas) == 1 else "")
    twin = Curve("objective/kl_coef", "β (KL coefficient)") if len(betas) > 1 else None
    return CurvePlot("kl", title, "KL (nats per answer)", tuple(curves), twin, "β", zero_line=True)


def curve_plots(rows: list[dict]) -> list[CurvePlot]:
    """The report's per-iteration plots, in display order (reward components and eval groups from the rows)."""
    components = [Curve(k, f"component: {k.removeprefix('reward/')}") for k in _keys_like(rows, "reward/")]
    behaviors = [Curve(k, k.split("/")[1]) for k in _keys_like(rows, "eval/", "/behavior_rate")]
    group_behaviors = [Curve(k, k.split("/")[1]) for k in _keys_like(rows, "group/", "/behaviour")]
    group_lengths = [Curve(k, k.split("/")[1]) for k in _keys_like(rows, "group/", "/length")]
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
            "group_behaviour", "Behaviour rate per prompt group", "share of answers with behaviour",
            tuple(group_behaviors), ylim=share,
        ),
        CurvePlot("group_length", "Answer length per prompt group", "length (tokens)", tuple(group_lengths)),
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
    fig, ax = new_figure()
    ax.plot(kls, scores, color=REFERENCE_COLOR, lw=1, zorder=1)
    dots = ax.scatter(kls, scores, c=iterations, cmap="viridis", s=40, edgecolors="white", linewidths=0.6, zorder=2)
    fig.colorbar(dots, ax=ax, label="PPO iteration")
    for label, index in (("start", 0), ("end", -1)):
        ax.annotate(label, (kls[index], scores[index]), xytext=(6, 4), textcoords="offset points", fontsize=9)
    ax.set_title("Reward vs KL trajectory")
    ax.set_xlabel("KL to the reference (nats per answer)")
    ax.set_ylabel("task score (mean per answer)")
    return save_figure(fig, plot_dir / "reward_vs_kl.png", "Reward vs KL trajectory")


def plot_behavior_bars(evaluation: dict, plot_dir: Path) -> FigureRef | None:
    """Behaviour rate of the reference (before) and the policy (after), side by side per probe group."""
    groups = evaluation.get("groups") or {}
    if not groups:
        return None
    names = list(groups)
    unchanged = set(unchanged_probe_groups(evaluation))
    fig, ax = new_figure()
    sides = (("reference", "reference (before)", REFERENCE_COLOR), ("policy", "policy (after)", POLICY_COLOR))
    draw_grouped_bars(ax, names, [
        (label, [finite_value(groups[name].get(side, {}), "behavior_rate") or 0.0 for name in names], color)
        for side, label, color in sides
    ])  # fmt: skip
    behavior = textwrap.shorten(str(evaluation.get("behavior", "behaviour")), 32, placeholder="…")
    ax.set_title(f"Locality map: behaviour rate per probe group ({behavior})")
    labels = [f"{name}\n(unchanged)" if name in unchanged else name for name in names]
    ax.set_xticks(range(len(names)), labels, rotation=20 if len(names) > 4 else 0)
    ax.set_ylabel("share of answers with behaviour")
    ax.set_ylim(0, 1.15)
    # no x-axis label: the group names say it, and rotated names would push it into the legend
    legend_below(ax, *ax.get_legend_handles_labels())
    return save_figure(fig, plot_dir / "behavior_by_group.png", "Behaviour rate per probe group")


def _header_blocks(run: Run, notes: list[HealthNote]) -> list[Block]:
    """Final metrics and the key config numbers as tiles."""
    rows = run.rows
    total_time = sum(metric_series(rows, "time/iteration")[1])
    final = [
        ("iterations", fmt(len(rows))),
        ("final task score", fmt(last_value(rows, "objective/scores"))),
        ("final score − β·KL", fmt(last_value(rows, "objective/rlhf_reward"))),
        ("final KL (nats/answer)", fmt(last_value(rows, "objective/kl"))),
        ("final β", fmt(last_value(rows, "objective/kl_coef"))),
        ("final entropy (nats/token)", fmt(last_value(rows, "objective/entropy"))),
        ("final EOS rate", fmt(last_value(rows, "rollout/eos_rate"))),
        ("final distinct-2", fmt(last_value(rows, "diversity/distinct_2"))),
        ("training time", f"{total_time / 60:.1f} min" if total_time else "–"),
        ("health alarms", str(len(notes))),
    ]
    config = [
        (key, fmt(value)) for key, value in flatten(run.config).items()
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
    return f"{fmt(before)} → {fmt(after)}"


def _policy_kl(group: dict) -> str:
    """'k1 / k3' of the policy's answers (the reference's KL to itself is 0 by construction)."""
    policy = group.get("policy", {})
    return f"{fmt(finite_value(policy, 'kl_k1'))} / {fmt(finite_value(policy, 'kl_k3'))}"


def probe_blocks(evaluation: dict) -> list[Block]:
    """The probe-group table (reference → policy per metric) with the paragraph that reads it; also used by
    the model card."""
    groups = evaluation.get("groups") or {}
    intro = (
        f"Behaviour measured: `{evaluation.get('behavior', '?')}`. Each cell reads reference → policy; KL is the "
        "policy's (the reference's own KL is 0). NLL is the answers' per-token negative log-likelihood under "
        "the reference model, a fluency proxy (higher = less like the reference's own text). Correct: the share "
        "of answers matching the probe file's expected answer (groups without expected answers: –)."
    )
    return [Text(intro), Table(
        ["group", "behaviour rate", "reward", "KL k1 / k3 (nats)", "NLL under reference (nats/token)",
         "distinct-2", "length (tokens)", "correct"],
        [
            [name, _arrow(g, "behavior_rate"), _arrow(g, "reward_mean"), _policy_kl(g), _arrow(g, "nll_reference"),
             _arrow(g, "distinct_2"), _arrow(g, "length"),
             _arrow(g, "correct_rate") if "correct_rate" in g.get("policy", {}) else "–"]
            for name, g in groups.items()
        ],
    )]  # fmt: skip


def _eval_blocks(run: Run, bars: FigureRef | None) -> list[Block]:
    """The probe-group table, the behaviour bar chart and the greedy before/after answers per group."""
    blocks: list[Block] = [Heading("Probe evaluation"), *probe_blocks(run.eval or {})]
    if bars:
        blocks.append(Figures([bars]))
    if run.answers:
        blocks += [Heading("Greedy answers before and after", 3)]
        for group in dict.fromkeys(a.get("group", "?") for a in run.answers):
            rows = [
                [a.get("prompt", ""), a.get("reference", ""), fmt(a.get("reference_reward")),
                 a.get("policy", ""), fmt(a.get("policy_reward"))]
                for a in run.answers if a.get("group", "?") == group
            ]  # fmt: skip
            blocks += [Heading(group, 4), Table(["prompt", "reference", "reward", "policy", "reward"], rows)]
    return blocks


def _first_last(rows: list[dict], key: str) -> str:
    """'first → last' value of one metric over the run."""
    values = metric_series(rows, key)[1]
    return f"{fmt(values[0])} → {fmt(values[-1])}" if values else "–"


def _reward_text(reward: object) -> str:
    """A group's reward as a cell: `none`, the spec, or `w·spec + ...` for weighted terms."""
    if reward is None:
        return "none"
    if isinstance(reward, list):
        return " + ".join(f"{fmt(t.get('weight', 1.0))}·{t.get('spec')}" for t in reward if isinstance(t, dict))
    return str(reward)


def _group_blocks(run: Run) -> list[Block]:
    """The training prompt groups (data.groups): their settings and per-group metrics, first → last iteration."""
    groups = (run.config.get("data") or {}).get("groups") or []
    if not groups:
        return []
    table = Table(
        ["group", "share", "reward", "KL scale", "retain KL", "expect", "score", "behaviour rate",
         "KL (nats/answer)", "length (tokens)"],
        [
            [g.get("name", "?"), fmt(g.get("share")), _reward_text(g.get("reward")), fmt(g.get("kl_scale")),
             fmt(g.get("retain_kl_coef", 0.0)), g.get("expect", ""),
             *(_first_last(run.rows, f"group/{g.get('name')}/{m}") for m in ("score", "behaviour", "kl", "length"))]
            for g in groups
        ],
    )  # fmt: skip
    intro = ("Metrics of the training rollouts per prompt group, first → last iteration; KL scale multiplies β on "
             "the group's answers, retain KL weighs the exact KL to the reference over the vocabulary on them, "
             "`unchanged` groups should keep their start behaviour rate.")
    return [Heading("Prompt groups"), Text(intro), table]


def _sample_blocks(samples: list[dict]) -> list[Block]:
    """Completions of the first and the last logged iteration, with their scores."""
    iterations = sorted({s.get("iteration", 0) for s in samples})
    blocks: list[Block] = [Heading("Samples")]
    if not iterations:
        return blocks + [Text("No samples were logged.")]
    for iteration in dict.fromkeys((iterations[0], iterations[-1])):
        chosen = [s for s in samples if s.get("iteration", 0) == iteration][:SAMPLES_PER_TABLE]
        rows = [
            [s.get("prompt", ""), s.get("completion", ""), fmt(s.get("score")),
             ", ".join(f"{k} {fmt(v)}" for k, v in (s.get("components") or {}).items())]
            for s in chosen
        ]  # fmt: skip
        blocks += [Heading(f"Iteration {iteration}", 3), Table(["prompt", "completion", "score", "components"], rows)]
    return blocks


def build_document(run: Run, curves: list[FigureRef], bars: FigureRef | None, notes: list[HealthNote]) -> Document:
    """The whole report as blocks, in reading order."""
    doc = Document(f"rlhflab report — {run.name}")
    doc.blocks += _header_blocks(run, notes)
    doc.blocks += [Heading("Health"), Notes(notes)]
    doc.blocks += _group_blocks(run)
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


# ----------------------------------------------------------------------------------------------- entry


def run_notes(run: Run) -> list[HealthNote]:
    """The health alarms of a run: its metric stream (with its `expect: unchanged` groups) and its probe evaluation."""
    groups = (run.config.get("data") or {}).get("groups") or []
    unchanged = frozenset(g.get("name") for g in groups if g.get("expect") == "unchanged")
    notes = check_health(run.rows, unchanged)
    if run.eval:
        notes += check_evaluation(run.eval, int(run.rows[-1].get("iteration", len(run.rows))) if run.rows else 0)
    return notes


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
    doc = build_document(run, [c for c in curves if c], bars, run_notes(run))
    html_path, md_path = run_dir / "report.html", run_dir / "report.md"
    html_path.write_text(render_html(doc), encoding="utf-8")
    md_path.write_text(render_markdown(doc, run_dir), encoding="utf-8")
    return html_path, md_path
