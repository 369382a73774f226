"""Diversity of a set of answers: distinct-n and self-BLEU (pure functions on strings, no nltk).

Both work on the same word tokens (see `tokenize`), so their numbers are comparable across runs.

- distinct-n (Li et al., 2016): unique n-grams / total n-grams over all texts. 1.0 means no n-gram repeats;
  a policy collapsing onto one answer drives it towards 0.
- self-BLEU (Zhu et al., 2018, Texygen): how much each text is reproduced by the others. 1.0 means all texts
  are the same; 0.0 means no text shares even a word with another.
"""

from __future__ import annotations

import math
import re
from collections import Counter

# A word is a run of letters/digits/underscores (apostrophes kept inside words: "don't"); every other
# non-space character is a token of its own, so "red." and "red!" share the word "red".
_TOKEN_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens: `"The sky is RED!"` -> `["the", "sky", "is", "red", "!"]`."""
    return _TOKEN_RE.findall(text.lower())


def words(text: str) -> list[str]:
    """The word tokens of `tokenize`, punctuation dropped: `"Red, red!"` -> `["red", "red"]`."""
    return [t for t in tokenize(text) if t[0].isalnum()]


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    """All n-grams of one token list, in order (none if the list is shorter than n)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams, counted over all texts (n-grams never cross text boundaries).

    Returns 0.0 when the texts hold no n-gram at all (empty list, or every text shorter than n tokens).
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    grams = [g for text in texts for g in ngrams(tokenize(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sentence_bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Smoothed sentence BLEU of one token list against several reference token lists.

    BLEU = BP * exp( (1/N) * sum_{n=1..N} log p_n ),   N = max_n, where

    - m_n = sum over the hypothesis' n-grams g of min(count_hyp(g), max_r count_r(g))   (clipped matches)
    - l_n = number of n-grams in the hypothesis
    - p_1 = m_1 / l_1, and p_n = (m_n + 1) / (l_n + 1) for n >= 2 (add-one smoothing of the higher orders,
      "method 2" of Chen & Cherry 2014), so a short sentence with no 4-gram match is not scored 0, while a
      sentence sharing no word at all (m_1 = 0) still gets exactly 0;
    - BP = 1 if c > r else exp(1 - r / c), with c the hypothesis length and r the length of the reference
      closest to c (the shorter one on ties).

    An empty hypothesis scores 0.
    """
    if not hypothesis or not references:
        return 0.0
    log_sum = 0.0
    for n in range(1, max_n + 1):
        hyp_counts = Counter(ngrams(hypothesis, n))
        max_ref_counts: Counter = Counter()
        for ref in references:
            max_ref_counts |= Counter(ngrams(ref, n))  # `|` keeps the max count per n-gram
        matches = sum(min(count, max_ref_counts[g]) for g, count in hyp_counts.items())
        total = sum(hyp_counts.values())
        if n == 1:
            if matches == 0:
                return 0.0
            log_sum += math.log(matches / total)
        else:
            log_sum += math.log((matches + 1) / (total + 1))
    c = len(hypothesis)
    r = min((len(ref) for ref in references), key=lambda length: (abs(length - c), length))
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(log_sum / max_n)


def self_bleu(texts: list[str], max_n: int = 4) -> float:
    """Mean over texts of `sentence_bleu(text_i, references = all other texts)`; 0.0 for fewer than 2 texts.

    self-BLEU = (1/K) * sum_i BLEU(t_i, {t_j : j != i}), K = len(texts). O(K^2) in the number of texts, which
    is fine for the tens of answers per probe group it is used on.
    """
    if len(texts) < 2:
        return 0.0
    tokens = [tokenize(t) for t in texts]
    scores = [sentence_bleu(hyp, tokens[:i] + tokens[i + 1 :], max_n) for i, hyp in enumerate(tokens)]
    return sum(scores) / len(scores)
