"""Stage 2: reward specs → one plain callable ``(prompts, completions, metadata) -> list[float]``.

A reward is any callable that takes three equal-length lists (prompt strings, completion strings, one
metadata dict per sample) and returns one float per completion; a NaN or inf means "no reward" for that
sample (PPO leaves it out of its update and counts it as ``reward/nonfinite``). :func:`build_reward` turns spec
strings (``contains:red``, ``length:20:80``, ``python:my_rewards.py:score``, ``hf-classifier:./sst2``,
``model:RM_DIR`` for a reward model trained by ``rlhflab rm train``, ``http:URL`` for a reward server,
``not:SPEC`` for 1 where SPEC scores ≤ 0),
plain callables, or weighted lists of them into a :class:`Reward`: the weighted sum of its components,
which also reports each component's unweighted values for the ``reward/<name>`` metrics.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhflab.config import names_a_file
from rlhflab.errors import UserError

RewardFn = Callable[[list[str], list[str], list[dict]], Sequence[float]]

HF_BATCH_SIZE = 16

# Seed 003's word lists and weights (its ``get_sentiment_reward``); negations from its ``positivity_reward``.
POSITIVE_WORDS = {
    "good": 1, "great": 2, "excellent": 3, "wonderful": 3, "amazing": 3, "happy": 2, "glad": 1, "love": 3,
    "like": 1, "awesome": 2, "fun": 2, "super": 2, "incredible": 3, "perfect": 3,
}  # fmt: skip
NEGATIVE_WORDS = {
    "bad": 1, "awful": 2, "terrible": 3, "angry": 2, "horrible": 3, "lame": 1, "hate": 3, "gross": 2,
    "sad": 1, "upset": 2,
}  # fmt: skip
NEGATIONS = frozenset(
    "not no never don't doesn't didn't isn't wasn't aren't weren't can't cannot won't nor".split()
)
# Words every prompt shares with every answer; counting them would make relevance reward filler.
STOPWORDS = frozenset(
    "a an the and or but of to in on at for with by from as is are was were be been it its this that "
    "these those what which who how why when where do does did i you he she we they me my your".split()
)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")


class _SpecError(ValueError):
    """A bad spec; build_reward turns it into a one-line UserError naming the spec."""


def _words(text: str) -> list[str]:
    """Lowercase words, punctuation stripped ("Works." → "works"); keeps contractions ("don't")."""
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _preview(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return '"' + (flat if len(flat) <= limit else flat[: limit - 1] + "…") + '"'


# ---- per-sample scores -------------------------------------------------------------------------------


def length_score(text: str, lo: int = 50, hi: int = 500) -> float:
    """Seed 003's length reward on n whitespace-separated words: n/lo below lo, 1 in [lo, hi], then a linear
    fall to 0 at 2·hi: max(0, 1 − (n − hi)/hi)."""
    n = len(text.split())
    if n < lo:
        return n / lo
    if n <= hi:
        return 1.0
    return max(0.0, 1.0 - (n - hi) / hi)


def relevance_score(prompt: str, text: str) -> float:
    """Share of the prompt's words that the completion uses, in [0, 1] (seed 003's prompt-word overlap).

    Unlike the seed's raw ``split()``, words are lowercased with punctuation stripped ("works." matches
    "works") and common function words are dropped, unless the prompt has nothing else.
    """
    prompt_words = set(_words(prompt))
    keys = (prompt_words - STOPWORDS) or prompt_words
    if not keys:
        return 0.0
    return len(keys & set(_words(text))) / len(keys)


def format_score(text: str) -> float:
    """Mean of seed 003's three checks: a blank line (paragraph break), a sentence end followed by a capital,
    a capital first letter. Unlike the seed, leading whitespace is skipped (completions usually start with
    a space) and the blank line may hold spaces."""
    checks = (
        re.search(r"\n[ \t]*\n", text),
        re.search(r"[.!?]\s+[A-Z]", text),
        re.match(r"[A-Z]", text.lstrip()),
    )
    return sum(check is not None for check in checks) / len(checks)


def lexicon_score(text: str) -> float:
    """Seed 003's weighted word lists with its negation and repetition handling, in [-1, 1].

    Word w is worth v(w) = POSITIVE_WORDS[w] − NEGATIVE_WORDS[w] (0 if in neither); right after a word in
    NEGATIONS it is worth −v(w)/2 instead ("not good" −0.5, "not bad" +0.5). With n words, u of them
    distinct: score = clip(Σ / n · u / n, −1, 1), a per-word density times the repetition factor u/n, so
    repeating a good word does not pay ("good good good good good" → 0.2).
    """
    words = _words(text)
    if not words:
        return 0.0
    total = 0.0
    for prev, word in zip([""] + words, words):
        value = POSITIVE_WORDS.get(word, 0) - NEGATIVE_WORDS.get(word, 0)
        total += -value / 2 if prev in NEGATIONS else value
    score = total / len(words) * len(set(words)) / len(words)
    return max(-1.0, min(1.0, score))


def _each(score: Callable[[str, str], float]) -> RewardFn:
    """Lift a per-sample score ``(prompt, completion) -> float`` to a batch reward."""

    def reward(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
        return [score(prompt, completion) for prompt, completion in zip(prompts, completions)]

    return reward


# ---- spec builders: (argument after the first colon or None, base_dir) -> (name, reward) -------------


def _build_contains(arg: str | None, base_dir: Path) -> tuple[str, RewardFn]:
    word, *options = (arg or "").split(":")
    if not word:
        raise _SpecError("write contains:WORD, e.g. contains:red")
    for option in options:
        if option not in ("substring", "case"):
            raise _SpecError(f"unknown option {option!r}; options are 'substring' and 'case'")
    body = re.escape(word) if "substring" in options else rf"(?<!\w){re.escape(word)}(?!\w)"
    pattern = re.compile(body, 0 if "case" in options else re.IGNORECASE)
    name = "contains_" + (re.sub(r"\W+", "_", word).strip("_") or "text")
    return name, _each(lambda _, text: float(pattern.search(text) is not None))


def _build_regex(arg: str | None, base_dir: Path) -> tuple[str, RewardFn]:
    if not arg:
        raise _SpecError(r"write regex:PATTERN, e.g. regex:\bred\b")
    try:
        pattern = re.compile(arg)
    except re.error as exc:
        raise _SpecError(f"invalid regular expression ({exc}); fix the pattern") from None
    return "regex", _each(lambda _, text: float(pattern.search(text) is not None))


def _build_length(arg: str | None, base_dir: Path) -> tuple[str, RewardFn]:
    lo, hi = 50, 500
    if arg is not None:
        parts = arg.split(":")
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            raise _SpecError("write length or length:MIN:MAX in whole words, e.g. length:20:80")
        lo, hi = int(parts[0]), int(parts[1])
        if not 0 < lo <= hi:
            raise _SpecError(f"need 0 < MIN <= MAX, got MIN={lo} MAX={hi}")
    return "length", _each(lambda _, text: length_score(text, lo, hi))


def _build_vader(arg: str | None, base_dir: Path) -> tuple[str, RewardFn]:
    _reject_argument("vader", arg)
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise _SpecError("vaderSentiment is not installed; run: pip install vaderSentiment") from None
    analyzer = SentimentIntensityAnalyzer()
    return "vader", _each(lambda _, text: analyzer.polarity_scores(text)["compound"])


def _reject_argument(name: str, arg: str | None) -> None:
    if arg is not None:
        raise _SpecError(f"'{name}' takes no arguments; write just '{name}'")


def _no_argument(name: str, score: Callable[[str, str], float]) -> Callable[[str | None, Path], tuple[str, RewardFn]]:
    def builder(arg: str | None, base_dir: Path) -> tuple[str, RewardFn]:
        _reject_argument(name, arg)
        return name, _each(score)

    return builder


def _load_module(target: str, base_dir: Path) -> Any:
    if not names_a_file(target):
        try:
            return importlib.import_module(target)
        except Exception as exc:
            raise _SpecError(f"cannot import module {target!r} ({type(exc).__name__}: {exc})") from None
    path = (base_dir / target).expanduser()
    if not path.is_file():
        raise _SpecError(f"no such file {path}; paths are relative to {base_dir}")
    module_name = f"rlhflab_user_reward_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise _SpecError(f"importing {path} failed ({type(exc).__name__}: {exc})") from None
    return module


def _build_python(arg: str | None, base_dir: Path) -> tuple[str, RewardFn]:
    target, _, func = (arg or "").rpartition(":")
    if not target or not func:
        raise _SpecError("write python:path/to/file.py:function or python:package.module:function")
    module = _load_module(target, base_dir)
    fn = getattr(module, func, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        close = difflib.get_close_matches(func, names, 1)
        defined = ", ".join(sorted(names)) or "nothing callable"
        hint = f"did you mean {close[0]!r}?" if close else f"it defines: {defined}"
        raise _SpecError(f"{target} has no function {func!r}; {hint}")
    if not callable(fn):
        raise _SpecError(f"{target}:{func} is a {type(fn).__name__}, not a function")
    return f"python_{func}", _checked_signature(fn, f"python_{func}")


def _checked_signature(fn: Callable, name: str) -> RewardFn:
    try:
        inspect.signature(fn).bind([], [], [])
    except TypeError:
        raise _SpecError(
            f"{name} must accept (prompts, completions, metadata) and return one float per completion; "
            f"wrap a per-text f(text) as: lambda prompts, completions, metadata: [f(c) for c in completions]"
        ) from None
    except ValueError:  # some builtins have no introspectable signature; a bad one fails on first call
        pass
    return fn


class HFClassifierReward:
    """Softmax probability of one label under a Hugging Face sequence classifier, scored on completions.

    Loaded once (eval mode, so no dropout) onto the GPU if there is one; scores HF_BATCH_SIZE texts at a
    time. ``label`` is a name from ``config.id2label`` or an index; by default the label named "positive"
    (any case) if there is one, else the last.
    """

    def __init__(self, path_or_id: str, label: str | None, base_dir: Path):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local = base_dir / Path(path_or_id).expanduser()
        if not local.is_dir() and path_or_id.startswith((".", "/", "~")):
            raise _SpecError(f"no such directory {local}; paths are relative to {base_dir}")
        source = str(local) if local.is_dir() else path_or_id
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModelForSequenceClassification.from_pretrained(source).eval()
        except Exception as exc:
            cause = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            if local.is_dir():
                raise _SpecError(f"cannot load a classifier and tokenizer from {local} ({cause})") from None
            raise _SpecError(
                f"cannot load classifier {path_or_id!r}: it is not a local directory and loading it from the "
                f"Hugging Face Hub failed ({cause}); when offline, pass a local directory holding the model "
                "and tokenizer: hf-classifier:/path/to/model"
            ) from None
        if self.tokenizer.pad_token is None and self.tokenizer.eos_token is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token  # decoder-based classifiers ship no pad token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.label = _label_index(self.model.config.id2label, label)
        positions = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_length = min(self.tokenizer.model_max_length, positions, 512)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)

    def __call__(self, prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
        import torch

        scores: list[float] = []
        for start in range(0, len(completions), HF_BATCH_SIZE):
            batch = self.tokenizer(
                completions[start : start + HF_BATCH_SIZE],
                padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
            ).to(self.device)  # fmt: skip
            with torch.inference_mode():
                logits = self.model(**batch).logits  # (B, num_labels)
            scores += logits.float().softmax(-1)[:, self.label].tolist()
        return scores


def _label_index(id2label: Mapping[Any, str], label: str | None) -> int:
    names = {int(i): str(name) for i, name in id2label.items()}
    if label is None:
        return next((i for i, name in names.items() if name.lower() == "positive"), max(names))
    if label.isdigit() and int(label) in names:
        return int(label)
    for match in (lambda name: name == label, lambda name: name.lower() == label.lower()):
        found = [i for i, name in names.items() if match(name)]
        if found:
            return found[0]
    raise _SpecError(f"the model has no label {label!r}; its labels are {names}")


def _build_hf(arg: str | None, base_dir: Path) -> tuple[str, RewardFn]:
    source, sep, label = (arg or "").partition(":")
    if not source:
        raise _SpecError("write hf-classifier:PATH_OR_ID[:LABEL], e.g. hf-classifier:./sst2-model:POSITIVE")
    return "hf_classifier", HFClassifierReward(source, label if sep else None, base_dir)


def _build_model(arg: str | None, base_dir: Path) -> tuple[str, RewardFn]:
    """model:RM_DIR — a reward model written by `rlhflab rm train` (normalised scores, see reward_model.py)."""
    if not arg:
        raise _SpecError("write model:RM_DIR, a directory written by `rlhflab rm train`")
    path = base_dir / Path(arg).expanduser()
    if not (path / "rlhflab_rm.json").is_file():
        raise _SpecError(f"{path} is not a reward model directory (no rlhflab_rm.json); train one with "
                         "`rlhflab rm train --db DB --out RM_DIR`")
    from rlhflab.rewards.reward_model import load_reward_model  # lazy: loads torch and transformers

    return "reward_model", load_reward_model(path)


def _build_http(arg: str | None, base_dir: Path) -> tuple[str, RewardFn]:
    """http:URL[#timeout=S&retries=N] — a reward server; the request and answer are in rewards/remote.py."""
    from rlhflab.rewards.remote import HttpReward

    try:
        return "http", HttpReward(arg or "")
    except ValueError as exc:
        raise _SpecError(str(exc)) from None


def _build_not(arg: str | None, base_dir: Path) -> tuple[str, RewardFn]:
    """`not:SPEC`: 1 where SPEC scores ≤ 0 (the behaviour is absent), else 0 — a reward for leaving it out."""
    if not arg:
        raise _SpecError("write not:SPEC, e.g. not:contains:red")
    name, inner = _component(arg, base_dir)

    def reward(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
        # NaN/inf (no reward) stays NaN: the trainer drops that sample instead of calling it a 1
        return [value if not math.isfinite(value) else float(value <= 0)
                for value in _run(name, inner, prompts, completions, metadata)]

    return "not_" + name, reward


_BUILDERS: dict[str, Callable[[str | None, Path], tuple[str, RewardFn]]] = {
    "contains": _build_contains,
    "regex": _build_regex,
    "length": _build_length,
    "relevance": _no_argument("relevance", relevance_score),
    "format": _no_argument("format", lambda _, text: format_score(text)),
    "lexicon": _no_argument("lexicon", lambda _, text: lexicon_score(text)),
    "vader": _build_vader,
    "python": _build_python,
    "hf-classifier": _build_hf,
    "model": _build_model,
    "http": _build_http,
    "not": _build_not,
}


# ---- the composite -------------------------------------------------------------------------------------


class Reward:
    """Weighted sum of named reward components; itself a plain reward callable."""

    def __init__(self, components: list[tuple[str, float, RewardFn]]):
        self.components = components  # (name, weight, fn)

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.components]

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> tuple[list[float], dict[str, list[float]]]:
        """Return (weighted total per sample, unweighted values per component name)."""
        prompts, completions = list(prompts), list(completions)
        metadata = list(metadata) if metadata is not None else [{} for _ in completions]
        if not len(prompts) == len(completions) == len(metadata):
            counts = f"{len(prompts)} prompts, {len(completions)} completions, {len(metadata)} metadata"
            raise ValueError(f"reward inputs must have equal lengths, got {counts}")
        values = {name: _run(name, fn, prompts, completions, metadata) for name, _, fn in self.components}
        weighted = [[weight * value for value in values[name]] for name, weight, _ in self.components]
        total = [sum(column) for column in zip(*weighted)]
        return total, values

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> list[float]:
        return self.score(prompts, completions, metadata)[0]


def _run(
    name: str, fn: RewardFn, prompts: list[str], completions: list[str], metadata: list[dict]
) -> list[float]:
    """Call one component and check it returned one float per completion (NaN and inf allowed: "no reward")."""
    if not completions:
        return []
    try:
        out = fn(prompts, completions, metadata)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"reward {name!r} raised {type(exc).__name__}: {' '.join(str(exc).split())} on a batch of "
            f"{len(completions)} samples (first: {_preview(completions[0])})"
        ) from exc
    try:
        values = [float(value) for value in out]
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"reward {name!r} returned {type(out).__name__} ({exc}): return one float per completion"
        ) from exc
    if len(values) != len(completions):
        raise UserError(
            f"reward {name!r} returned {len(values)} values for {len(completions)} completions: "
            "return one float per completion"
        )
    return values  # NaN/inf pass through: PPO leaves such a sample out of its update (docs/ppo.md)


def _component(spec: Any, base_dir: Path) -> tuple[str, RewardFn]:
    if callable(spec):
        name = re.sub(r"\W+", "_", getattr(spec, "__name__", type(spec).__name__)).strip("_") or "reward"
        try:
            return name, _checked_signature(spec, name)
        except _SpecError as exc:
            raise UserError(f"bad reward callable {name!r}: {exc}") from None
    if not isinstance(spec, str):
        raise UserError(f"reward spec {spec!r} is neither a spec string nor a callable; e.g. 'contains:red'")
    kind, sep, arg = spec.strip().partition(":")
    if kind not in _BUILDERS:
        close = difflib.get_close_matches(kind, _BUILDERS, 1)
        hint = f"did you mean '{close[0]}{sep}{arg}'? " if close else ""
        raise UserError(f"unknown reward spec {spec!r}: {hint}valid kinds: {', '.join(_BUILDERS)}")
    try:
        return _BUILDERS[kind](arg if sep else None, base_dir)
    except _SpecError as exc:
        raise UserError(f"bad reward spec {spec!r}: {exc}") from None


def _entry(item: Any) -> tuple[Any, float, str | None]:
    """One list entry → (spec, weight, name); a bare spec string or callable means weight 1."""
    if isinstance(item, str) or callable(item):
        return item, 1.0, None
    if hasattr(item, "model_dump"):  # a config.RewardTerm
        item = item.model_dump()
    if not isinstance(item, Mapping):
        raise UserError(f"reward spec {item!r} is neither a spec string nor a callable; e.g. 'contains:red'")
    if "spec" not in item or set(item) - {"spec", "weight", "name"}:
        raise UserError(f"bad reward entry {item!r}: write {{'spec': 'contains:red', 'weight': 1.0, 'name': 'red'}}")
    weight = 1.0 if item.get("weight") is None else item["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise UserError(f"reward {item['spec']!r} has weight {weight!r}: weights must be finite numbers")
    name = item.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise UserError(f"reward {item['spec']!r} has name {name!r}: names must be non-empty strings")
    return item["spec"], float(weight), name


def build_reward(spec: Any, base_dir: str | Path | None = None) -> Reward:
    """Build a :class:`Reward` from a spec string, a reward callable, or a list of either or of
    ``{"spec": ..., "weight": 1.0, "name": None}``. Relative paths in ``python:``, ``model:`` and
    ``hf-classifier:`` specs are relative to base_dir (default: the working directory; a recipe's specs arrive
    absolute from `config.resolve_paths`). Bad specs raise UserError."""
    if isinstance(spec, Reward):
        return spec
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    entries = [_entry(item) for item in (spec if isinstance(spec, (list, tuple)) else [spec])]
    if not entries:
        raise UserError("the reward list is empty: give at least one spec, e.g. contains:red")
    components: list[tuple[str, float, RewardFn]] = []
    for item_spec, weight, name in entries:
        default_name, fn = _component(item_spec, base)
        components.append((_unique(name or default_name, {n for n, _, _ in components}), weight, fn))
    return Reward(components)


def _unique(name: str, taken: set[str]) -> str:
    suffix = 2
    candidate = name
    while candidate in taken:
        candidate, suffix = f"{name}_{suffix}", suffix + 1
    return candidate
