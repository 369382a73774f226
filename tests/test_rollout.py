"""Sampling: repeated prompts share one prompt forward without changing what is generated."""

import torch

from rlhflab.models import load_causal_lm, load_tokenizer
from rlhflab.rollout import _prefill_unique_prompts, generate

CPU = torch.device("cpu")


def test_repeated_prompts_generate_as_if_each_ran_alone():
    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny", CPU, torch.float32).eval()
    prompts = ["What color is the sky?", "Hi", "Name a colour, please."]
    repeated = [p for p in prompts for _ in range(3)]  # samples per prompt, grouped as rollouts lay them out
    shared = generate(model, tok, repeated, 12, do_sample=False)
    alone = [generate(model, tok, [p], 12, do_sample=False) for p in prompts]
    assert shared.texts == [g.texts[0] for g in alone for _ in range(3)]
    for i, g in enumerate(alone):
        t = int(g.response_mask.sum())
        for row in range(3 * i, 3 * i + 3):
            assert torch.equal(shared.response_ids[row, :t], g.response_ids[0, :t])
            assert torch.allclose(shared.logprobs[row, :t], g.logprobs[0, :t], atol=1e-5)


def test_prefill_runs_once_per_distinct_prompt():
    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny", CPU, torch.float32).eval()
    texts = ["ab", "cde", "ab", "cde", "cde"]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    calls = []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                with_kwargs=True)
    with torch.no_grad():
        cache = _prefill_unique_prompts(model, texts, enc)
    assert calls == [torch.Size([2, enc["input_ids"].shape[1] - 1])]  # two distinct prompts, last token left out
    assert cache.get_seq_length() == enc["input_ids"].shape[1] - 1
    assert cache.layers[0].keys.shape[0] == len(texts)
    assert _prefill_unique_prompts(model, ["ab", "cde"], enc) is None  # nothing repeats: nothing to share
