"""The KL-ablation table of docs/experiments/kl_ablation.md, from a finished sweep directory.

    python docs/experiments/kl_ablation_table.py runs/kl_ablation

Per run: reward, KL, distinct-1/2 and entropy at the first iteration and over the last three, and two signs of
answers degenerating into reward words, read from samples.jsonl (the first and last three iterations): the share
of words that VADER's lexicon scores positive, and the share of answers in which one positive word occurs three
times or more ("love love fun love love").
"""

import json
import sys
from collections import Counter
from pathlib import Path

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from rlhflab.data.diversity import words

LEXICON = SentimentIntensityAnalyzer().lexicon


def word_signs(answers: list[str]) -> tuple[float, float]:
    """(share of words VADER scores positive, share of answers with a positive word three or more times)."""
    all_words = [w for a in answers for w in words(a)]
    positive = sum(LEXICON.get(w, 0.0) > 0 for w in all_words) / max(len(all_words), 1)
    counts = [Counter(w for w in words(a) if LEXICON.get(w, 0.0) > 0) for a in answers]
    repeats = sum(max(c.values(), default=0) >= 3 for c in counts) / max(len(answers), 1)
    return positive, repeats


def main(sweep_dir: Path) -> None:
    keys = ("objective/scores", "objective/kl", "diversity/distinct_1", "diversity/distinct_2", "objective/entropy")
    print("| β | seed | reward | KL (nats/answer) | distinct-1 | distinct-2 | distinct-2 change | entropy "
          "| positive words | answers repeating a positive word ≥ 3× |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in json.loads((sweep_dir / "sweep.json").read_text())["runs"]:
        rows = [json.loads(line) for line in open(sweep_dir / run["dir"] / "metrics.jsonl")]
        first, last = rows[0], {k: sum(r[k] for r in rows[-3:]) / 3 for k in keys}
        samples = [json.loads(line) for line in open(sweep_dir / run["dir"] / "samples.jsonl")]
        n = rows[-1]["iteration"]
        early = word_signs([s["completion"] for s in samples if s["iteration"] <= 3])
        late = word_signs([s["completion"] for s in samples if s["iteration"] > n - 3])
        cells = [f"{first[k]:.2f} → {last[k]:.2f}" for k in keys]
        change = last["diversity/distinct_2"] / first["diversity/distinct_2"] - 1
        print(f"| {run['overrides']['ppo.kl_coef']} | {run['seed']} | {' | '.join(cells[:4])} | {change:+.0%} | "
              f"{cells[4]} | {early[0]:.0%} → {late[0]:.0%} | {early[1]:.0%} → {late[1]:.0%} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
