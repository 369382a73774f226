"""Sampling: repeated prompts share one prompt forward without changing what is generated; what is sampled is
the model's softmax whatever its generation_config.json says; every EOS id ends an answer; plain prompts get
their BOS."""

import json
import shutil

import pytest
import torch

from rlhflab.data.prompts import Prompt, render_prompt
from rlhflab.errors import UserError
from rlhflab.models.loading import load_causal_lm, load_tokenizer, resolve_model_dir
from rlhflab.ppo.rollout import (
    INERT_DECODING,
    NEUTRAL_DECODING,
    StepSampler,
    _prefill,
    check_decoding_fields,
    forward_answers,
    generate,
    response_mask_after_eos,
)
from rlhflab.runs.seeding import sample_uniforms, stream_seed

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


def test_an_answer_drawn_from_its_own_stream_is_the_same_in_any_batch():
    """With per-sample uniforms, sample i's tokens depend on its stream only: the same answers whether the batch
    is sampled at once, in chunks, or split between two processes (each sampling its rows with their rows of
    the uniforms), and whatever the global generator's state."""
    tok = load_tokenizer("tiny")
    model = load_causal_lm("tiny", CPU, torch.float32).eval()
    prompts = [p for p in ["What color is the sky?", "Hi", "Name a colour, please.", "Say something."] for _ in range(2)]
    uniforms = sample_uniforms((0, 1, 5), range(len(prompts)), 10)
    torch.manual_seed(1)
    whole = generate(model, tok, prompts, 10, uniforms=uniforms)
    torch.manual_seed(2)
    chunks = generate(model, tok, prompts, 10, uniforms=uniforms, batch_size=3)
    halves = [generate(model, tok, prompts[s], 10, uniforms=uniforms[s]) for s in (slice(0, 4), slice(4, 8))]
    assert chunks.texts == whole.texts == halves[0].texts + halves[1].texts
    assert len(set(whole.texts)) > 4  # sampled, not one answer per prompt
    other = generate(model, tok, prompts, 10, uniforms=sample_uniforms((1, 1, 5), range(len(prompts)), 10))
    assert other.texts != whole.texts  # another seed is another stream


def test_stream_seeds_depend_on_their_keys_alone():
    assert stream_seed(0, 1, 2, 3) == stream_seed(0, 1, 2, 3) < 2**63
    assert len({stream_seed(0, 1, it, i) for it in range(20) for i in range(20)}) == 400
    a = sample_uniforms((7, 1, 3), [5, 6], 4)
    assert torch.equal(a[1], sample_uniforms((7, 1, 3), [6], 4)[0]) and ((a >= 0) & (a < 1)).all()


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


def test_step_sampler_draws_from_the_tempered_top_k_top_p_distribution():
    """The sampler's draws follow softmax(logits / T) restricted by top-k/top-p, and it hands generate's
    argmax exactly one token per row."""
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


def test_step_sampler_records_the_tempered_full_softmax_log_prob_and_entropy():
    """Top-k restricts the draw, not the recorded policy: log π and entropy are those of softmax(logits / T)."""
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    tempered = torch.softmax(probs.log() / 2.0, -1)
    sampler = StepSampler(2.0, 2, 1.0, record=True)
    rows = probs.log().expand(1000, -1).clone()
    tokens = sampler(None, rows).argmax(1)
    assert set(tokens.tolist()) == {0, 1}
    assert torch.allclose(sampler.logprobs[0], tempered.log()[tokens])
    assert torch.allclose(sampler.entropy[0], -(tempered * tempered.log()).sum().expand(1000))
    greedy = StepSampler(2.0, do_sample=False, record=True)
    assert greedy(None, rows).argmax(1).eq(0).all() and torch.allclose(greedy.logprobs[0], tempered.log()[0])


def tiny_dir(tmp_path, name: str, **generation_config) -> str:
    """A copy of the tiny model whose generation_config.json also sets `generation_config`."""
    path = tmp_path / name
    shutil.copytree(resolve_model_dir("tiny"), path)
    shipped = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**shipped, **generation_config}))
    return str(path)


def real_repeats(query_ids, response_ids, response_mask) -> int:
    """Answer tokens (up to the first EOS) that already occur earlier in their prompt or answer."""
    count = 0
    for query, answer, mask in zip(query_ids.tolist(), response_ids.tolist(), response_mask.tolist()):
        seen = set(query)
        for token, real in zip(answer, mask):
            count += bool(real) and token in seen
            seen.add(token)
    return count


def test_generation_config_json_does_not_change_what_is_sampled(tmp_path):
    """Model dirs whose generation_config.json penalises repeats, or sets every distribution-changing field,
    sample exactly what the same weights sample without it (same seed, same draws: stronger than equal
    frequencies), with the log-probs a training forward gives; transformers' own sampling from the
    penalised dir is visibly penalised."""
    everything = dict(
        repetition_penalty=3.0, no_repeat_ngram_size=1, suppress_tokens=[70, 71], begin_suppress_tokens=[72],
        min_new_tokens=4, bad_words_ids=[[73]], sequence_bias=[[[74], 5.0]], forced_eos_token_id=2,
        exponential_decay_length_penalty=[2, 1.5], renormalize_logits=True, remove_invalid_values=True,
        encoder_no_repeat_ngram_size=2, encoder_repetition_penalty=2.0, min_length=3, num_beams=2,
        num_return_sequences=2, top_k=5, temperature=0.3, do_sample=True, guidance_scale=1.5,
        watermarking_config={"bias": 2.0}, forced_bos_token_id=3, max_time=0.01, prompt_lookup_num_tokens=3,
        token_healing=True, penalty_alpha=0.6, stop_strings=["a"],
    )
    tok = load_tokenizer("tiny")
    texts = ["Hi"] * 32
    gens, models = [], []
    for name, fields in [("plain", {}), ("penalised", dict(repetition_penalty=3.0, no_repeat_ngram_size=1)),
                         ("everything", everything)]:
        models.append(load_causal_lm(tiny_dir(tmp_path, name, **fields), CPU, torch.float32))
        torch.manual_seed(0)
        gens.append(generate(models[-1], tok, texts, 32, temperature=0.9))
    for gen, model in zip(gens[1:], models[1:]):
        assert torch.equal(gen.response_ids, gens[0].response_ids)
        assert torch.equal(gen.logprobs, gens[0].logprobs)
        assert torch.allclose(gen.logprobs, forward_answers(gen, model, 0.9).logprobs, atol=1e-5)
    # near-uniform draws over 259 tokens repeat an earlier token ~2 times in 32 (~64 here, Poisson sd 8);
    # no_repeat_ngram_size 1 forbids any repeat
    gen = gens[1]
    assert real_repeats(gen.query_ids, gen.response_ids, gen.response_mask) >= 20
    enc = tok(texts, return_tensors="pt", add_special_tokens=False)
    hf = models[1].generate(**enc, max_new_tokens=32, pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    assert real_repeats(enc.input_ids, hf, response_mask_after_eos(hf, tok.eos_token_id)[0]) == 0


def test_every_generation_config_field_is_neutralised_or_known_inert(monkeypatch):
    """A transformers upgrade that adds a GenerationConfig field fails here until the field is classified;
    a model that sets an unclassified field is refused."""
    from transformers import GenerationConfig

    from rlhflab.ppo import rollout

    assert not set(NEUTRAL_DECODING) & INERT_DECODING
    assert set(GenerationConfig().to_dict()) <= set(NEUTRAL_DECODING) | INERT_DECODING
    model = load_causal_lm("tiny", CPU, torch.float32)
    check_decoding_fields(model)  # the tiny model's own file passes
    monkeypatch.setattr(rollout, "INERT_DECODING", INERT_DECODING - {"top_h"})
    model.generation_config.top_h = 0.5
    with pytest.raises(UserError, match="generation_config.json sets top_h"):
        check_decoding_fields(model)


def test_answers_stop_at_every_eos_id_of_the_tokenizer_and_the_generation_config(tmp_path):
    assert response_mask_after_eos(torch.tensor([[5, 7, 9, 7], [5, 6, 6, 6]]), [9, 7])[0].tolist() == [
        [1, 1, 0, 0], [1, 1, 1, 1]]
    tok = load_tokenizer("tiny")
    prompt = ["What color is the sky?"]
    torch.manual_seed(0)
    answer = generate(load_causal_lm("tiny", CPU, torch.float32), tok, prompt, 16).response_ids[0].tolist()
    assert tok.eos_token_id not in answer
    t = next(t for t in range(2, len(answer)) if answer[t] not in answer[:t])  # first new token from the 3rd on
    model = load_causal_lm(tiny_dir(tmp_path, "two_eos", eos_token_id=[tok.eos_token_id, answer[t]]), CPU,
                           torch.float32)
    torch.manual_seed(0)
    stopped = generate(model, tok, prompt, 16)
    assert stopped.response_ids[0].tolist() == answer[: t + 1]  # generation stopped at the second EOS id
    assert stopped.has_eos.tolist() == [True]
    assert stopped.response_mask.sum().item() == t + 1


def test_plain_prompts_get_the_bos_their_tokenizer_adds_and_chat_templates_keep_theirs():
    tok = load_tokenizer("tiny")
    assert render_prompt(Prompt(text="Hi"), tok, "plain") == "Hi"  # this tokenizer adds no BOS
    tok.add_bos_token = True  # now it does, as Llama's does
    bos = tok.bos_token_id
    plain = render_prompt(Prompt(text="Hi"), tok, "plain")
    assert tok(plain, add_special_tokens=False).input_ids == tok("Hi").input_ids == [bos, 42, 75]
    assert render_prompt(Prompt(text=plain), tok, "plain") == plain  # not doubled
    texts = [plain, render_prompt(Prompt(text="Hello"), tok, "plain")]
    gen = generate(load_causal_lm("tiny", CPU, torch.float32), tok, texts, 2)
    assert [ids[mask.bool()][0].item() for ids, mask in zip(gen.query_ids, gen.query_mask)] == [bos, bos]
    messages = [{"role": "user", "content": "Hi"}]
    for template in (tok.chat_template, "{{ bos_token }}" + tok.chat_template):  # one writes its own BOS
        tok.chat_template = template
        ours = tok(render_prompt(Prompt(text="Hi"), tok, "chat"), add_special_tokens=False).input_ids
        assert ours == tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
