"""distinct-n and self-BLEU against values worked out by hand on tiny strings."""

import math

import pytest

from rlhflab.data.diversity import distinct_n, self_bleu, sentence_bleu, tokenize, words


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("The sky is RED! Don't  panic.") == ["the", "sky", "is", "red", "!", "don't", "panic", "."]


def test_words_drops_punctuation_tokens():
    assert words("Beautiful, beautiful... Don't 2 panic!") == ["beautiful", "beautiful", "don't", "2", "panic"]


def test_distinct_n_hand_values():
    texts = ["the sky is red", "the sky is blue"]
    # unigrams: the sky is red the sky is blue -> 5 unique of 8
    assert distinct_n(texts, 1) == pytest.approx(5 / 8)
    # bigrams: (the sky)(sky is)(is red) + (the sky)(sky is)(is blue) -> 4 unique of 6
    assert distinct_n(texts, 2) == pytest.approx(4 / 6)


def test_distinct_n_does_not_join_texts():
    # "a b" + "c" would make the bigram (b, c) if texts were concatenated; only (a, b) exists.
    assert distinct_n(["a b", "c"], 2) == 1.0


def test_distinct_n_without_ngrams_is_zero():
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["one"], 2) == 0.0


def test_self_bleu_identical_texts_is_one():
    assert self_bleu(["the sky is red today", "the sky is red today", "the sky is red today"]) == pytest.approx(1.0)


def test_self_bleu_disjoint_texts_is_zero():
    assert self_bleu(["the sky is red", "grass grows green", "bananas taste sweet"]) == 0.0


def test_self_bleu_needs_two_texts():
    assert self_bleu([]) == 0.0
    assert self_bleu(["alone"]) == 0.0


def test_sentence_bleu_hand_value():
    # hyp "a b c d", ref "a b c e": p1 = 3/4, p2 = (2+1)/(3+1) = 3/4, p3 = (1+1)/(2+1) = 2/3,
    # p4 = (0+1)/(1+1) = 1/2; equal lengths -> BP = 1.
    expected = math.exp((math.log(3 / 4) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert sentence_bleu(["a", "b", "c", "d"], [["a", "b", "c", "e"]]) == pytest.approx(expected)


def test_sentence_bleu_brevity_penalty_and_clipping():
    # hyp "a a" vs ref "a b c": clipped p1 = 1/2 (ref has one "a"), p2 = (0+1)/(1+1); BP = exp(1 - 3/2).
    expected = math.exp(1 - 3 / 2) * math.exp((math.log(1 / 2) + math.log(1 / 2)) / 2)
    assert sentence_bleu(["a", "a"], [["a", "b", "c"]], max_n=2) == pytest.approx(expected)


def test_self_bleu_is_mean_over_texts():
    texts = ["a b c d", "a b c e"]
    one_way = sentence_bleu(tokenize(texts[0]), [tokenize(texts[1])])
    other_way = sentence_bleu(tokenize(texts[1]), [tokenize(texts[0])])
    assert self_bleu(texts) == pytest.approx((one_way + other_way) / 2)
