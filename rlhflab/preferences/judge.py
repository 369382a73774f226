"""AI feedback (RLAIF): label pending pairs with a reward function acting as the judge.

The judge is any reward callable `(prompts, completions, metadata) -> list[float]`, e.g. the one
`rlhflab.rewards.build_reward("vader")` returns. Both answers of a pair are scored in the same batch; the
higher score wins, and scores within `margin` of each other are a tie. The judge is recorded as the
labeler (e.g. "judge:vader") with both scores in the comparison's note, so its labels sit beside human
ones and `prefs stats` can measure how often they agree.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

from rlhflab.errors import UserError
from rlhflab.preferences.store import Pair, PreferenceStore

RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]


def judge_pending(
    store: PreferenceStore, reward_fn: RewardFn, labeler_name: str, margin: float = 0.0, batch_size: int = 32
) -> dict[str, int]:
    """Label every pair `labeler_name` has not labeled yet; returns how many got a, b and tie.

    Each batch of pairs is committed before the next is scored, so an interrupted run keeps its work and a
    rerun continues with the pairs still pending.
    """
    if margin < 0:
        raise UserError(f"--margin must be >= 0, got {margin}")
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    counts = Counter({"a": 0, "b": 0, "tie": 0})
    while batch := store.pending_pairs(labeler_name, limit=batch_size):
        labels = [
            (pair.id, labeler_name, choose(score_a, score_b, margin), f"score_a={score_a:.6g} score_b={score_b:.6g}")
            for pair, (score_a, score_b) in zip(batch, _score(batch, reward_fn, labeler_name))
        ]
        store.record_labels(labels)
        counts.update(choice for _, _, choice, _ in labels)
    return dict(counts)


def choose(score_a: float, score_b: float, margin: float) -> str:
    """"a" or "b" for the higher score; "tie" when the scores are within `margin` of each other."""
    if abs(score_a - score_b) <= margin:
        return "tie"
    return "a" if score_a > score_b else "b"


def _score(batch: list[Pair], reward_fn: RewardFn, judge: str) -> list[tuple[float, float]]:
    """Scores (a, b) per pair from one reward call over all answers of the batch."""
    prompts = [pair.prompt.text for pair in batch for _ in "ab"]
    completions = [text for pair in batch for text in (pair.a.text, pair.b.text)]
    metadata = [{"pair_id": pair.id, "side": side} for pair in batch for side in "ab"]
    scores = [float(s) for s in reward_fn(prompts, completions, metadata)]
    if len(scores) != len(completions):
        raise UserError(f"judge {judge} returned {len(scores)} scores for {len(completions)} answers")
    if not all(math.isfinite(s) for s in scores):
        raise UserError(f"judge {judge} returned a non-finite score (NaN or inf); no labels stored for this batch")
    return list(zip(scores[0::2], scores[1::2]))
