"""Sampling: repeated prompts share one prompt forward without changing what is generated."""

import pytest
import torch

from rlhflab.models.loading import load_causal_lm, load_tokenizer
from rlhflab.ppo.rollout import _prefill, generate

CPU = torch.device("cpu")


@pytest.mark.parametrize("system", ["", "<|im_start|>system\nbe brief<|im_end|>\n"])
def test_repeated_prompts_generate_as_if_each_ran_alone(system):
    """Sharing the prefill (repeated prompts, a common prefix) changes no token and no log-prob."""
    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny", CPU, torch.float32).eval()
    prompts = [system + p for p in ["What color is the sky?", "Hi", "Name a colour, please."]]
    repeated = [p for p in prompts for _ in range(3)]  # samples per prompt, grouped as rollouts lay them out
    shared = generate(model, tok, repeated, 12, do_sample=False)
    alone = [generate(model, tok, [p], 12, do_sample=False) for p in prompts]
    assert shared.texts == [g.texts[0] for g in alone for _ in range(3)]
    for i, g in enumerate(alone):
        t = int(g.response_mask.sum())
        for row in range(3 * i, 3 * i + 3):
            assert torch.equal(shared.response_ids[row, :t], g.response_ids[0, :t])
            assert torch.allclose(shared.logprobs[row, :t], g.logprobs[0, :t], atol=1e-5)


def test_prefill_runs_the_shared_prefix_once_and_each_distinct_prompt_once():
    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny", CPU, torch.float32).eval()
    system = "<|im_start|>system\nbe brief<|im_end|>\n"
    texts = [system + t for t in ["ab", "cde fgh", "ab", "cde fgh", "cde fgh"]]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    P = len(tok(system, add_special_tokens=False).input_ids)  # the common tokens
    longest = enc["attention_mask"].sum(1).max().item()
    calls = []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                with_kwargs=True)
    with torch.no_grad():
        cache, ids, mask = _prefill(model, texts, enc)
    # the prefix at batch 1, then the two distinct prompts' remaining tokens but the last
    assert calls == [torch.Size([1, P]), torch.Size([2, longest - P - 1])]
    assert cache.get_seq_length() == ids.shape[1] - 1 == longest - 1
    assert cache.layers[0].keys.shape[0] == len(texts)
    for row, text in zip(range(len(texts)), texts):  # each row holds its own prompt's tokens
        assert tok.decode(ids[row][mask[row].bool()]) == text
    no_shared = tok(["ab", "cde"], return_tensors="pt", padding=True, add_special_tokens=False)
    assert _prefill(model, ["ab", "cde"], no_shared) is None  # nothing repeats, no common prefix


def test_inverse_cdf_sampler_draws_from_the_tempered_top_k_top_p_distribution():
    """The sampler's draws follow softmax(logits / T) restricted by top-k/top-p, and it hands generate's
    argmax exactly one token per row."""
    from rlhflab.ppo.rollout import StepSampler

    torch.manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]))
    rows = logits.expand(40000, -1).clone()

    def frequencies(sampler):
        out = sampler(None, rows)
        assert torch.equal(torch.isfinite(out).sum(1), torch.ones(len(rows), dtype=torch.long))
        return torch.bincount(out.argmax(1), minlength=5).float() / len(rows)

    assert torch.allclose(frequencies(StepSampler(1.0, 0, 1.0)), torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.01)
    tempered = torch.softmax(logits / 2.0, -1)
    assert torch.allclose(frequencies(StepSampler(2.0, 0, 1.0)), tempered, atol=0.01)
    assert torch.allclose(frequencies(StepSampler(1.0, 2, 1.0)), torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.01)
    top_p = frequencies(StepSampler(1.0, 0, 0.9))  # keeps the smallest set with mass ≥ 0.9: 3 tokens
    assert torch.allclose(top_p, torch.tensor([0.5, 0.3, 0.15, 0, 0]) / 0.95, atol=0.01)
