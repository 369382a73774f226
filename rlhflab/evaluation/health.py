"""Health alarms read from the metric stream (one metrics.jsonl row per PPO iteration).

Each alarm fires at most once per run, at the first iteration its condition holds, as a `HealthNote` that
says what was seen, the likely cause and what to change. The trainer feeds every row to a `HealthMonitor`
and prints new notes as warnings; the report runs `check_health` over the whole file.

Rows may lack keys (no critic -> no value/*, eval/* only every few iterations): an alarm whose metrics are
missing from a row simply does not look at that row.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# negative_kl: k1 is unbiased but noisy, so a small negative mean is normal; a mean this negative is not.
KL_K1_MIN = -0.5  # nats per answer
NEGATIVE_KL_STREAK = 3  # iterations in a row with objective/kl < 0
# ratio_blowup: pi/pi_old should stay near 1 inside the clip range.
# One token among hundreds reaching 10–50× is routine at a high learning rate (the clip stops its push);
# a max above 100, or a mean ratio off 1, means the whole batch moved too far.
RATIO_MAX_LIMIT = 100.0
RATIO_MEAN_TOLERANCE = 0.2  # |mean ratio - 1|
# eos_collapse: answers that mostly ran into max_new_tokens from the start (sky_red: 12 % ended at 24 tokens)
# have no stopping habit to lose, and one batch of 32 answers is noisy, so the fall must last.
EOS_FIRST_MIN = 0.3  # the first EOS rate must be at least this ...
EOS_DROP_FRACTION = 0.5  # ... and the rate below this fraction of it ...
EOS_RATE_FLOOR = 0.5  # ... and below this absolute rate ...
EOS_STREAK = 3  # ... for this many iterations in a row
# value_ev_negative: the critic gets a warm-up before its explained variance is judged.
VALUE_EV_WARMUP = 5  # iterations ignored
VALUE_EV_STREAK = 5  # iterations in a row with explained variance < 0 after the warm-up
# diversity_collapse: relative fall of distinct-2 from its first value.
DISTINCT2_DROP = 0.30
# edit_leaking: the task score rose, and a control probe group's behaviour rate moved with it.
SCORE_RISE = 0.2
CONTROL_BEHAVIOR_SHIFT = 0.15
CONTROL_GROUP_PREFIXES = ("unrelated", "capability")

_BEHAVIOR_KEY_RE = re.compile(r"^eval/(?P<group>[^/]+)/behavior_rate$")


@dataclass(frozen=True)
class HealthNote:
    """One alarm: which (`code`), when (`iteration`), what was seen, why it likely happens, what to change."""

    code: str
    iteration: int
    message: str
    cause: str
    fix: str


# code -> (likely cause, what to change)
ADVICE: dict[str, tuple[str, str]] = {
    "negative_kl": (
        "the log-probs used for KL do not match the distribution the tokens were sampled from (e.g. the "
        "sampling temperature or top-k/top-p not applied when scoring), or the k1 estimator's variance",
        "check the rollout temperature is applied to the logits when computing log-probs (policy and "
        "reference), use the k3 estimator (always >= 0), sample more answers per iteration",
    ),
    "ratio_blowup": (
        "updates too large for PPO's trust region: learning rate too high, too many epochs on one batch, "
        "or old log-probs computed differently from new ones (dropout on, other precision or padding)",
        "lower the learning rate, use fewer PPO epochs or a smaller clip range, and check old and new "
        "log-probs agree exactly on the first minibatch (ratio = 1)",
    ),
    "eos_collapse": (
        "the policy stopped ending its answers: the reward grows with length or rambling until "
        "max_new_tokens is not penalised",
        "penalise answers without EOS, raise the KL coefficient beta, and check the reward does not "
        "increase with answer length",
    ),
    "value_ev_negative": (
        "the critic predicts returns worse than their mean: value learning rate or loss weight off, "
        "unscaled rewards, or a value head that is not being trained",
        "raise the value loss coefficient or learning rate, whiten/scale rewards, warm up the critic, "
        "or use a critic-free advantage estimator (RLOO/GRPO)",
    ),
    "diversity_collapse": (
        "mode collapse: the policy concentrates on a few high-reward answers because the KL coefficient "
        "is too low or the learning rate too high",
        "raise the KL coefficient beta (or the adaptive KL target's strictness), lower the learning rate, "
        "and use more varied prompts",
    ),
    "edit_leaking": (
        "the edit spreads beyond its target: the reward is earned by a behaviour that also appears on "
        "prompts it should leave alone",
        "add unrelated prompts with a neutral or negative reward to training, raise beta, stop earlier, "
        "or make the behaviour spec more specific",
    ),
}


def finite_value(row: dict, key: str) -> float | None:
    """The row's value for `key` as a float, or None when it is missing or not a finite number."""
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _is_control_group(group: str) -> bool:
    """Probe groups that the edit should leave untouched (`unrelated*`, `capability*`)."""
    return group.lower().startswith(CONTROL_GROUP_PREFIXES)


@dataclass
class HealthMonitor:
    """Feed it metric rows in order with `update`; it returns the notes that fire for the first time."""

    first: dict[str, float] = field(default_factory=dict)  # first finite value seen per metric
    latest: dict[str, float] = field(default_factory=dict)  # last finite value seen per metric
    streaks: dict[str, int] = field(default_factory=dict)  # consecutive iterations a condition held
    fired: set[str] = field(default_factory=set)
    rows_seen: int = 0

    def update(self, row: dict) -> list[HealthNote]:
        """Record one iteration's metrics; return the alarms that fire for the first time at this row."""
        self.rows_seen += 1
        iteration = int(row.get("iteration", self.rows_seen))
        for key in row:
            value = finite_value(row, key)
            if value is not None:
                self.first.setdefault(key, value)
                self.latest[key] = value
        checks = {
            "negative_kl": self._negative_kl,
            "ratio_blowup": self._ratio_blowup,
            "eos_collapse": self._eos_collapse,
            "value_ev_negative": self._value_ev_negative,
            "diversity_collapse": self._diversity_collapse,
            "edit_leaking": self._edit_leaking,
        }
        notes = []
        for code, check in checks.items():
            if code in self.fired:
                continue
            message = check(row, iteration)
            if message:
                self.fired.add(code)
                cause, fix = ADVICE[code]
                notes.append(HealthNote(code, iteration, message, cause, fix))
        return notes

    def state_dict(self) -> dict:
        """Everything `update` remembers, as JSON, so a resumed run raises the alarms an unbroken one would."""
        return {"first": dict(self.first), "latest": dict(self.latest), "streaks": dict(self.streaks),
                "fired": sorted(self.fired), "rows_seen": self.rows_seen}

    def load_state_dict(self, state: dict) -> None:
        self.first, self.latest = dict(state["first"]), dict(state["latest"])
        self.streaks, self.fired = dict(state["streaks"]), set(state["fired"])
        self.rows_seen = state["rows_seen"]

    def _streak(self, name: str, holds: bool | None) -> int:
        """Count iterations in a row where `holds`; a False resets it, None (metric missing) leaves it."""
        if holds is not None:
            self.streaks[name] = self.streaks.get(name, 0) + 1 if holds else 0
        return self.streaks.get(name, 0)

    def _negative_kl(self, row: dict, it: int) -> str | None:
        k1, kl = finite_value(row, "objective/kl_k1"), finite_value(row, "objective/kl")
        streak = self._streak("negative_kl", None if kl is None else kl < 0)
        if k1 is not None and k1 < KL_K1_MIN:
            return f"objective/kl_k1 = {k1:.3g} nats at iteration {it} (below {KL_K1_MIN}): KL cannot be negative"
        if kl is not None and streak >= NEGATIVE_KL_STREAK:
            return f"objective/kl = {kl:.3g} nats at iteration {it}, negative {streak} iterations in a row"
        return None

    def _ratio_blowup(self, row: dict, it: int) -> str | None:
        ratio_max, ratio_mean = finite_value(row, "policy/ratio_max"), finite_value(row, "policy/ratio_mean")
        if ratio_max is not None and ratio_max > RATIO_MAX_LIMIT:
            return f"policy/ratio_max = {ratio_max:.3g} at iteration {it} (above {RATIO_MAX_LIMIT:g})"
        if ratio_mean is not None and abs(ratio_mean - 1) > RATIO_MEAN_TOLERANCE:
            return f"policy/ratio_mean = {ratio_mean:.3g} at iteration {it} (more than {RATIO_MEAN_TOLERANCE} from 1)"
        return None

    def _eos_collapse(self, row: dict, it: int) -> str | None:
        rate = finite_value(row, "rollout/eos_rate")
        if rate is None:
            return None
        first = self.first["rollout/eos_rate"]
        low = first >= EOS_FIRST_MIN and rate < EOS_DROP_FRACTION * first and rate < EOS_RATE_FLOOR
        if self._streak("eos_collapse", low) >= EOS_STREAK:
            return (f"rollout/eos_rate = {rate:.2f} at iteration {it}, below half its start ({first:.2f}) "
                    f"for {EOS_STREAK} iterations in a row")
        return None

    def _value_ev_negative(self, row: dict, it: int) -> str | None:
        ev = finite_value(row, "value/explained_variance")
        holds = None if ev is None or it <= VALUE_EV_WARMUP else ev < 0
        if ev is not None and self._streak("value_ev_negative", holds) >= VALUE_EV_STREAK:
            return (
                f"value/explained_variance = {ev:.3g} at iteration {it}, below 0 for "
                f"{VALUE_EV_STREAK} iterations in a row"
            )
        return None

    def _diversity_collapse(self, row: dict, it: int) -> str | None:
        d2 = finite_value(row, "diversity/distinct_2")
        if d2 is None:
            return None
        first = self.first["diversity/distinct_2"]
        if first > 0 and d2 <= first * (1 - DISTINCT2_DROP):
            return (
                f"diversity/distinct_2 = {d2:.3f} at iteration {it}, down {1 - d2 / first:.0%} from {first:.3f} "
                "(collapse: KL coefficient too low or learning rate too high)"
            )
        return None

    def _edit_leaking(self, row: dict, it: int) -> str | None:
        score = finite_value(row, "objective/scores")
        if score is None or score - self.first["objective/scores"] <= SCORE_RISE:
            return None
        # eval/* rows are sparse, so compare the latest control-group evaluation seen so far with the first.
        for key, value in self.latest.items():
            match = _BEHAVIOR_KEY_RE.match(key)
            if match and _is_control_group(match["group"]):
                shift = value - self.first[key]
                if abs(shift) > CONTROL_BEHAVIOR_SHIFT:
                    rise = score - self.first["objective/scores"]
                    return (
                        f"{key} = {value:.2f} at iteration {it} (moved {shift:+.2f}) while objective/scores "
                        f"rose {rise:+.2f} to {score:.3g}: the edit leaks into a control group"
                    )
        return None


def check_health(rows: list[dict]) -> list[HealthNote]:
    """Run a fresh `HealthMonitor` over all rows; every alarm that fires, in order of iteration."""
    monitor = HealthMonitor()
    return [note for row in rows for note in monitor.update(row)]
