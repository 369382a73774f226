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
# eos_collapse: answers that mostly ran into max_new_tokens from the start (sky_red_broad: 12 % ended at 24 tokens)
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
# answers_shrink: answers under half their start length (training; the first rollout is the reference's own
# habit) or under half the reference's length (probe evaluation). sky_red_broad: 36 → 3.8 tokens.
SHRINK_FRACTION = 0.5
SHRINK_STREAK = 3
# behaviour_leak: the behaviour rate of a group that should stay unchanged rises this much above its start
# (training) or above the reference's rate (probe evaluation). sky_red_broad: unrelated 0.06 → 0.97.
LEAK_RISE = 0.10
LEAK_STREAK = 3  # training batches are small (a few answers per group): the rise must last
# capability_loss: a probe group's share of correct answers (its prompts' `expected` patterns) falls this much
# below the reference's (more than 3 of 32 answers at 8 prompts × 4 samples: sampling noise stays under it).
CORRECT_DROP = 0.10
# no_signal: in each of the first iterations nearly every sample scored the same (polite reward: 15 of 16 at 0).
NO_SIGNAL_MODE_SHARE = 0.9
NO_SIGNAL_ITERATIONS = 3

_BEHAVIOR_KEY_RE = re.compile(r"^eval/(?P<group>[^/]+)/behavior_rate$")
_LENGTH_KEY_RE = re.compile(r"^(rollout/response_length|group/[^/]+/length)$")


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
    "answers_shrink": (
        "the reward is earned in the first few tokens and nothing holds the rest of the answer: the KL penalty "
        "on the rewarded prompts is too weak to keep the reference's answers, so they shrink to the rewarded word",
        "raise ppo.kl_coef or the target group's kl_scale, add a length-aware term to its reward (e.g. "
        "{spec: 'length:8:60', weight: 0.5}), lower the learning rate or stop earlier (docs/scoped.md)",
    ),
    "behaviour_leak": (
        "the edit spreads past its target: too little in training says where the behaviour is not wanted",
        "with no retain group holding prompts like the leaking group's, add one (data.groups: expect: unchanged, "
        "reward: not:SPEC or null, kl_scale > 1, retain_kl_coef > 0); with one, raise its share, kl_scale or "
        "retain_kl_coef or lower the learning rate (docs/scoped.md)",
    ),
    "capability_loss": (
        "the update reaches past the edit into what the model knows: the policy moved far from the reference on "
        "prompts the reward never asked about",
        "add prompts like the failing group's to a retain group (expect: unchanged, retain_kl_coef > 0), lower the "
        "learning rate or stop earlier (docs/scoped.md)",
    ),
    "no_signal": (
        "nearly every sample gets the same score, so the advantages carry almost no reward signal: from a "
        "reward it rarely earns the policy learns slowly (sky_red_broad.yaml: 1 of 32 answers for 7 iterations) "
        "or not at all",
        "sample more answers per prompt (rollout.samples_per_prompt 4-8) with a group baseline "
        "(ppo.advantage_estimator: rloo or grpo), make the reward denser or shaped (partial credit, a weighted "
        "second term), or raise the sampling temperature",
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
    unchanged: frozenset[str] = frozenset()  # training groups marked `expect: unchanged` (from the config)

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
            "answers_shrink": self._answers_shrink,
            "behaviour_leak": self._behaviour_leak,
            "no_signal": self._no_signal,
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

    def _answers_shrink(self, row: dict, it: int) -> str | None:
        shrunk = []
        for key in sorted(k for k in row if _LENGTH_KEY_RE.match(k)):
            length = finite_value(row, key)
            if length is not None and self._streak(key, length < SHRINK_FRACTION * self.first[key]) >= SHRINK_STREAK:
                shrunk.append(f"{key} = {length:.1f} tokens (started at {self.first[key]:.1f})")
        if shrunk:
            return (f"answers shrank below {SHRINK_FRACTION:.0%} of their start length for {SHRINK_STREAK} "
                    f"iterations in a row at iteration {it}: " + "; ".join(shrunk))
        return None

    def _behaviour_leak(self, row: dict, it: int) -> str | None:
        for name in sorted(self.unchanged):
            key = f"group/{name}/behaviour"
            rate = finite_value(row, key)
            rise = None if rate is None else rate - self.first[key]
            if rise is not None and self._streak(key, rise > LEAK_RISE) >= LEAK_STREAK:
                return (f"{key} = {rate:.2f} at iteration {it}, up {rise:+.2f} from {self.first[key]:.2f} for "
                        f"{LEAK_STREAK} iterations in a row: the behaviour shows up in a group marked "
                        "`expect: unchanged`")
        return None

    def _no_signal(self, row: dict, it: int) -> str | None:
        share, std = finite_value(row, "objective/scores_mode_share"), finite_value(row, "objective/scores_std")
        flat = (share is not None and share >= NO_SIGNAL_MODE_SHARE) or (std is not None and std < 1e-6)
        streak = self._streak("no_signal", flat if (share, std) != (None, None) else None)
        if streak >= NO_SIGNAL_ITERATIONS and streak == self.rows_seen == NO_SIGNAL_ITERATIONS:
            return (f"the reward gives (almost) no signal: in each of the first {streak} iterations at least "
                    f"{NO_SIGNAL_MODE_SHARE:.0%} of the samples scored the same (objective/scores_mode_share = "
                    f"{share if share is not None else 1:.2f}, objective/scores_std = {std if std is not None else 0:.3g})")
        return None


def check_health(rows: list[dict], unchanged: frozenset[str] = frozenset()) -> list[HealthNote]:
    """Run a fresh `HealthMonitor` over all rows (`unchanged`: training groups marked so); every alarm that fires,
    in order of iteration."""
    monitor = HealthMonitor(unchanged=frozenset(unchanged))
    return [note for row in rows for note in monitor.update(row)]


def unchanged_probe_groups(result: dict) -> list[str]:
    """The probe groups an edit should leave alone: those the probe file lists under `unchanged`, else (a file
    that lists none) the control groups by name (`unrelated*`, `capability*`)."""
    groups = list(result.get("groups") or {})
    listed = result.get("unchanged")
    return [g for g in groups if g in listed] if listed else [g for g in groups if _is_control_group(g)]


def check_evaluation(result: dict, iteration: int) -> list[HealthNote]:
    """Alarms from a probe evaluation (eval.json), policy against reference per group: answers under half the
    reference's length (any group), behaviour rate more than LEAK_RISE above the reference's in a group that
    should stay unchanged, a share of correct answers more than CORRECT_DROP below the reference's (groups with
    expected answers). `iteration` is the one evaluated (the last)."""
    groups = result.get("groups") or {}
    shrunk, leaks, wrong = [], [], []
    for name, sides in groups.items():
        policy, reference = sides.get("policy", {}), sides.get("reference", {})
        length, ref_length = finite_value(policy, "length"), finite_value(reference, "length")
        if length is not None and ref_length and length < SHRINK_FRACTION * ref_length:
            shrunk.append(f"{name} {length:.1f} vs {ref_length:.1f} tokens")
        rate, ref_rate = finite_value(policy, "behavior_rate"), finite_value(reference, "behavior_rate")
        if name in unchanged_probe_groups(result) and None not in (rate, ref_rate) and rate - ref_rate > LEAK_RISE:
            leaks.append(f"{name} {ref_rate:.2f} → {rate:.2f}")
        correct, ref_correct = finite_value(policy, "correct_rate"), finite_value(reference, "correct_rate")
        if None not in (correct, ref_correct) and ref_correct - correct > CORRECT_DROP:
            wrong.append(f"{name} {ref_correct:.2f} → {correct:.2f}")
    notes = []
    if shrunk:
        notes.append(HealthNote("answers_shrink", iteration, "probe answers are under half the reference's length: "
                                + "; ".join(shrunk), *ADVICE["answers_shrink"]))
    if leaks:
        notes.append(HealthNote("behaviour_leak", iteration, f"behaviour `{result.get('behavior', '?')}` rose more "
                                f"than {LEAK_RISE:.2f} above the reference in probe groups that should stay "
                                "unchanged: " + "; ".join(leaks), *ADVICE["behaviour_leak"]))
    if wrong:
        notes.append(HealthNote("capability_loss", iteration, "probe answers are correct less often than the "
                                "reference's: " + "; ".join(wrong), *ADVICE["capability_loss"]))
    return notes
