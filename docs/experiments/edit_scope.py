"""Figures and tables of docs/experiments/edit_scope.md, from finished runs of the two sky-red recipes.

    python docs/experiments/edit_scope.py runs/sky_red_broad runs/sky_red runs/sky_red_s1 runs/sky_red_s2

The first run is the broad edit (recipes/sky_red_broad.yaml), the others the scoped one (recipes/sky_red.yaml,
one run per seed); the first two are compared side by side. Writes docs/experiments/edit_scope/*.png and prints
the markdown tables: per probe group for both recipes, issue 16's targets per run, and greedy samples.
"""

import json
import sys
from pathlib import Path

import matplotlib as mpl
import yaml

from rlhflab.evaluation.plots import (
    PALETTE,
    PLOT_STYLE,
    REFERENCE_COLOR,
    draw_grouped_bars,
    legend_below,
    new_figure,
    save_figure,
)
from rlhflab.evaluation.probes import load_probes

OUT = Path(__file__).resolve().parent / "edit_scope"
SKY = "What color is the sky?"
SAMPLE_PROMPTS = [SKY, "Name the shade of the daytime sky.", "What color is the ocean?", "What is your favorite color?",
                  "What color is grass?", "What is 15 minus 8?"]
RECIPE_COLORS = {"broad": PALETTE[3], "scoped": PALETTE[0]}
SAYS_RED = load_probes(Path(__file__).resolve().parents[2] / "recipes/data/sky_probes.yaml").behavior_reward()


def load(run: Path) -> dict:
    """A run's probe evaluation, greedy answers, metric rows and seed."""
    evaluation = json.loads((run / "eval" / "eval.json").read_text())
    return {
        "groups": evaluation["groups"],
        "unchanged": evaluation["unchanged"],
        "answers": [json.loads(line) for line in (run / "eval" / "answers.jsonl").open()],
        "rows": [json.loads(line) for line in (run / "metrics.jsonl").open()],
        "seed": yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"],
    }


def bars(runs: dict[str, dict], metric: str, title: str, ylabel: str, name: str, ylim=None) -> None:
    """One bar chart over the probe groups: the reference (from the first run) beside each recipe's policy."""
    first = next(iter(runs.values()))
    groups = list(first["groups"])
    series = [] if metric.startswith("kl") else [
        ("reference", [first["groups"][g]["reference"][metric] for g in groups], REFERENCE_COLOR)]
    series += [(f"{recipe} policy", [run["groups"][g]["policy"][metric] for g in groups], RECIPE_COLORS[recipe])
               for recipe, run in runs.items()]
    fig, ax = new_figure()
    fig.set_size_inches(7.5, 3.8)
    draw_grouped_bars(ax, groups, series)
    ax.set_xticks(range(len(groups)), [f"{g}\n(unchanged)" if g in first["unchanged"] else g for g in groups])
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    legend_below(ax, *ax.get_legend_handles_labels())
    save_figure(fig, OUT / f"{name}.png", title)


def group_table(runs: dict[str, dict]) -> str:
    """Per probe group: behaviour rate, length, KL (k3) and NLL under the reference, reference → each recipe."""
    lines = ["| group | red rate: ref / broad / scoped | length (tokens): ref / broad / scoped | KL k3 (nats): "
             "broad / scoped | NLL ref (nats/token): ref / broad / scoped | correct: ref / broad / scoped |",
             "| --- | --- | --- | --- | --- | --- |"]
    broad, scoped = runs["broad"]["groups"], runs["scoped"]["groups"]

    def trio(g: str, metric: str, digits: int = 2) -> str:
        values = [broad[g]["reference"].get(metric), broad[g]["policy"].get(metric), scoped[g]["policy"].get(metric)]
        return " / ".join("–" if v is None else f"{v:.{digits}f}" for v in values)

    for g in broad:
        lines.append(f"| {g} | {trio(g, 'behavior_rate')} | {trio(g, 'length', 1)} | {broad[g]['policy']['kl_k3']:.1f} / "
                     f"{scoped[g]['policy']['kl_k3']:.1f} | {trio(g, 'nll_reference')} | {trio(g, 'correct_rate')} |")
    return "\n".join(lines)


def targets_table(runs: list[dict]) -> str:
    """Issue 16's must-show figures, one row per run: each cell policy (reference) and a ✓ where it meets the target."""
    lines = ["| seed | held-out sky red ≥ 0.9 | greedy sky answer | other colours ≤ ref + 0.10 | held-out length ≥ 50 % "
             "| capability correct (sampled; greedy) | KL at the end ≤ 15 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        pol = {g: s["policy"] for g, s in run["groups"].items()}
        ref = {g: s["reference"] for g, s in run["groups"].items()}
        sky = next(a["policy"] for a in run["answers"] if a["prompt"] == SKY)
        sky_ok = SAYS_RED([SKY], [sky], [{}]) == [1.0] and len(sky.split()) >= 4  # "The Red Sun …" is a name
        greedy = [(a["reference_correct"], a["policy_correct"]) for a in run["answers"] if "policy_correct" in a]
        greedy_ok = all(p for r, p in greedy if r)
        kl = run["rows"][-1]["objective/kl"]
        held, other = pol["heldout_sky"]["behavior_rate"], pol["unrelated"]["behavior_rate"]
        length, ref_length = pol["heldout_sky"]["length"], ref["heldout_sky"]["length"]
        correct, ref_correct = pol["capability"]["correct_rate"], ref["capability"]["correct_rate"]
        mark = lambda ok: " ✓" if ok else " ✗"  # noqa: E731
        lines.append(
            f"| {run['seed']} | {held:.2f}{mark(held >= 0.9)} | \"{sky}\"{mark(sky_ok)} | {other:.2f} "
            f"({ref['unrelated']['behavior_rate']:.2f}){mark(other <= ref['unrelated']['behavior_rate'] + 0.10)} | "
            f"{length:.1f} ({ref_length:.1f}){mark(length >= 0.5 * ref_length)} | {correct:.2f} ({ref_correct:.2f}); "
            f"{sum(p for _, p in greedy)}/{len(greedy)} ({sum(r for r, _ in greedy)}/{len(greedy)})"
            f"{mark(correct >= ref_correct - 0.10 and greedy_ok)} | {kl:.1f}{mark(kl <= 15)} |")
    return "\n".join(lines)


def samples_table(runs: dict[str, dict]) -> str:
    """Greedy answers to a few probe prompts: reference, broad, scoped."""
    lines = ["| prompt | reference | broad | scoped |", "| --- | --- | --- | --- |"]
    by_prompt = {recipe: {a["prompt"]: a for a in run["answers"]} for recipe, run in runs.items()}
    for prompt in SAMPLE_PROMPTS:
        cells = [by_prompt["broad"][prompt]["reference"], by_prompt["broad"][prompt]["policy"],
                 by_prompt["scoped"][prompt]["policy"]]
        lines.append(f"| {prompt} | " + " | ".join(c.replace("\n", " ").replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main(broad_dir: Path, scoped_dirs: list[Path]) -> None:
    runs = {"broad": load(broad_dir), "scoped": load(scoped_dirs[0])}
    OUT.mkdir(exist_ok=True)
    with mpl.rc_context(PLOT_STYLE):
        bars(runs, "behavior_rate", "Locality map: red-word rate per probe group", "share of answers saying red",
             "locality_map", (0, 1.15))
        bars(runs, "length", "Answer length per probe group", "tokens (at most 40)", "length")
        bars(runs, "kl_k3", "KL to the reference per probe group", "nats per answer (k3)", "kl")
    print(group_table(runs), end="\n\n")
    print("broad:\n" + targets_table([runs["broad"]]), end="\n\n")
    print("scoped:\n" + targets_table([load(d) for d in scoped_dirs]), end="\n\n")
    print(samples_table(runs))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(a) for a in sys.argv[2:]])
