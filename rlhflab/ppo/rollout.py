"""Stage 1 of an iteration: sample answers with the KV cache and record what PPO needs about them.

`generate` is the one entry point for sampling (training rollouts, evaluation, `rlhflab sample`), so another
generation backend can replace it without touching the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rlhflab.errors import UserError
from rlhflab.models.forward import (Forward, entropy_from_logits, forward_response, logprobs_from_logits,
                                   shared_prefix_len)
from rlhflab.models.loading import eos_token_ids


@dataclass
class Generation:
    """Sampled answers for a batch of prompts. B = samples, Q = prompt tokens, T = answer tokens."""

    query_ids: torch.Tensor  # (B, Q) prompt tokens, left-padded
    query_mask: torch.Tensor  # (B, Q) 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, T) sampled tokens; pad after the first EOS
    response_mask: torch.Tensor  # (B, T) float, 1 up to and including the first EOS
    has_eos: torch.Tensor  # (B,) bool, the answer emitted EOS within the budget
    logprobs: torch.Tensor | None  # (B, T) log π_old(token) at the sampling temperature, from the rollout itself
    entropy: torch.Tensor | None  # (B, T) entropy of π_old at each answer position
    values: torch.Tensor | None  # (B, T) V(s_t) from a value head on the policy trunk, if one was given
    texts: list[str]  # decoded answers without special tokens

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], 1)  # (B, Q+T)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], 1)  # (B, Q+T)

    def trimmed(self, rows) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prompt+answer of some rows without the columns that are padding in all of them (exact: only padding
        goes), so a forward pass costs what the longest real sequence needs.

        rows: a slice or index tensor -> (input_ids (b, L'), attention_mask (b, L'), answer length T')
        """
        query_mask, response_mask = self.query_mask[rows], self.response_mask[rows]
        first_real = int(query_mask.argmax(1).min())  # left padding: first column any row uses
        t = max(int(response_mask.sum(1).max()), 1)
        ids = torch.cat([self.query_ids[rows, first_real:], self.response_ids[rows, :t]], 1)
        mask = torch.cat([query_mask[:, first_real:], response_mask[:, :t].long()], 1)
        return ids, mask, t


def gather_generation(gen: Generation, processes, pad_id: int) -> Generation:
    """Every process's answers as one batch, rows in rank order; prompts stay left-padded, answers right-padded
    (padding columns change nothing a forward computes: position ids skip them)."""
    if processes.world_size == 1:
        return gen
    return Generation(
        processes.gather(gen.query_ids, pad_id, left=True), processes.gather(gen.query_mask, 0, left=True),
        processes.gather(gen.response_ids, pad_id), processes.gather(gen.response_mask),
        processes.gather(gen.has_eos), processes.gather(gen.logprobs), processes.gather(gen.entropy),
        processes.gather(gen.values), processes.gather_objects(gen.texts))


@dataclass
class Rollout:
    """One iteration's experience: the generation plus everything scored and estimated about it."""

    gen: Generation
    prompts: list[str]  # (B,) prompt as the reward sees it
    metadata: list[dict]  # (B,) per-prompt fields from the prompt file
    scores: torch.Tensor  # (B,) task score after missing-EOS penalty and normalisation (0 where not valid)
    raw_scores: torch.Tensor  # (B,) reward as returned, before any of that (NaN/inf kept)
    components: dict[str, list[float]]  # reward component -> (B,) values
    ref_logprobs: torch.Tensor  # (B, T) log π_ref(token)
    values: torch.Tensor | None  # (B, T) V(s_t) from the critic before the update
    kl: dict[str, torch.Tensor]  # k1/k2/k3 -> (B, T) per-token KL estimates
    rewards: torch.Tensor | None = None  # (B, T) KL-shaped per-token rewards (critic path)
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T) value targets
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: generate, score, forwards
    group_ids: torch.Tensor | None = None  # (B,) long, index of the sample's prompt group (config.prompt_groups)
    kl_scale: torch.Tensor | None = None  # (B,) its group's multiplier of β (data.groups[].kl_scale)
    retain_kl_coef: torch.Tensor | None = None  # (B,) its group's weight of the vocabulary KL (retain_kl_coef)
    ref_vocab: torch.Tensor | None = None  # (B', T, V) the reference's log-probs over the vocabulary, retain rows kept
    ref_vocab_rows: torch.Tensor | None = None  # (B,) bool: the rows ref_vocab holds, in order
    behaviour: torch.Tensor | None = None  # (B,) the behaviour detector's score (> 0: the answer shows it)
    valid: torch.Tensor | None = None  # (B,) bool: reward and advantages finite (None: all); the others train nothing
    local_tokens: int = 0  # prompt + answer tokens this process sampled (its share of the batch)

    def kept_reference(self, rows: torch.Tensor, t: int) -> torch.Tensor | None:
        """The reference's log-probs over the vocabulary kept for these rows (b,), their first t answer positions
        (b, t, V); None when the rollout kept none (the update then runs the reference's forward)."""
        if self.ref_vocab is None:
            return None
        return self.ref_vocab[(self.ref_vocab_rows.long().cumsum(0) - 1)[rows], :t]

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, T) the response mask of the samples the update learns from: all-0 rows for invalid ones."""
        mask = self.gen.response_mask
        return mask if self.valid is None else mask * self.valid.unsqueeze(1).to(mask.dtype)


def response_mask_after_eos(response_ids: torch.Tensor, eos_ids: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask that is 1 up to and including the first EOS (any of `eos_ids`), 0 after it (implementation detail 4).

    response_ids (B, T) -> (mask (B, T) float, has_eos (B,) bool)
    """
    is_eos = torch.isin(response_ids, torch.as_tensor(eos_ids, device=response_ids.device))
    after_first = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_first).float(), is_eos.any(1)


# Every GenerationConfig field that changes which token `generate` picks, at its neutral value. `generate`
# fills each field its caller leaves unset from the model's generation_config.json (a hub model's
# `repetition_penalty: 1.05` would sample from another distribution than the softmax our log-probs describe);
# fields passed as arguments override the file, None included.
NEUTRAL_DECODING = {
    # logits processors
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0,
    "min_new_tokens": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "remove_invalid_values": False, "guidance_scale": None, "watermarking_config": None,
    # decoding other than one greedy pass over StepSampler's pick; stops other than EOS and the token budget
    "num_beams": 1, "num_return_sequences": 1, "penalty_alpha": None, "constraints": None, "force_words_ids": None,
    "dola_layers": None, "use_mtp": False, "prompt_lookup_num_tokens": None, "assistant_early_exit": None,
    "token_healing": False, "stop_strings": None, "max_time": None,
}
# The remaining fields, which cannot change the tokens of that greedy pass.
INERT_DECODING = {
    # sampling warpers, built only with do_sample=True
    "temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff", "eta_cutoff",
    # beam search and assisted decoding only
    "early_stopping", "length_penalty", "diversity_penalty", "num_beam_groups", "low_memory", "is_assistant",
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight", "speculation_type",
    "max_matching_ngram_size",
    # lengths and ids we pass, caching and compilation, what is returned
    "max_length", "max_new_tokens", "do_sample", "eos_token_id", "pad_token_id", "bos_token_id",
    "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config", "max_cache_len",
    "prefill_chunk_size", "compile_config", "disable_compile", "continuous_batching_config", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate", "_from_model_config",
    "transformers_version",
}


def check_decoding_fields(model: nn.Module) -> None:
    """Refuse a model whose generation_config.json sets a field that neither list above knows (one a newer
    transformers added): it might change the distribution we sample from behind the log-probs' back."""
    from transformers import GenerationConfig

    known = GenerationConfig().to_dict()
    unknown = sorted(k for k in model.generation_config.to_diff_dict()
                     if k in known and k not in NEUTRAL_DECODING and k not in INERT_DECODING)
    if unknown:
        raise UserError(
            f"the model's generation_config.json sets {', '.join(unknown)}, which rlhflab does not know to leave the "
            "sampling distribution alone; remove it from the file (or add it to rollout.NEUTRAL_DECODING)"
        )


class StepSampler:
    """`generate`'s one logits processor: picks each next token, drawn (temperature, top-k, top-p) or greedy,
    leaves only that token for `generate`'s greedy argmax, and records the token's log-prob and the entropy at
    the sampling temperature as it goes.

    Recording here keeps a rollout's memory O(B·T): `output_logits` would keep every step's full-vocabulary
    logits, ≈ 4·B·T·V floats once stacked and soft-maxed (bench/rollout_memory.py). The scores it sees are the
    model's raw logits: NEUTRAL_DECODING leaves no other processor in front of it.

    transformers samples with torch.multinomial, which on CPU draws an exponential variate per vocabulary
    entry: ~35 ms a step at batch 16 over SmolLM2's 49k vocabulary, a fifth of a decode step. A cumulative
    sum and a binary search draw from the same distribution in ~3 ms; generate has no sampler hook, hence
    this processor.
    """

    def __init__(self, temperature: float, top_k: int = 0, top_p: float = 1.0, do_sample: bool = True,
                 record: bool = False, uniforms: torch.Tensor | None = None):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.temperature, self.do_sample, self.record = temperature, do_sample, record
        self.uniforms = uniforms  # (B, max_new_tokens) each row's own draws (seeding.sample_uniforms), or None
        self.steps = 0
        self.warpers = [TemperatureLogitsWarper(temperature)]
        if top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))
        self.logprobs: list[torch.Tensor] = []  # per step (B,) log π(picked token) at the temperature
        self.entropy: list[torch.Tensor] = []  # per step (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        token = self.draw(input_ids, scores) if self.do_sample else scores.argmax(-1, keepdim=True)  # (B, 1)
        self.steps += 1
        if self.record:  # top-k/top-p restrict the draw only: the log-probs describe the tempered softmax
            self.logprobs.append(logprobs_from_logits(scores, token.squeeze(1), self.temperature))
            self.entropy.append(entropy_from_logits(scores, self.temperature))
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)

    def draw(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, V) -> tokens (B, 1) drawn from softmax(scores / T) restricted by top-k/top-p."""
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        cdf = torch.softmax(scores.float(), -1).cumsum(-1)  # (B, V)
        if self.uniforms is None:
            u = torch.rand(len(cdf), 1, device=cdf.device)
        else:  # a row's token depends on its own stream only, not on the batch it shares
            u = self.uniforms[:, self.steps : self.steps + 1].to(cdf.device)
        u = u * cdf[:, -1:]  # (B, 1) in [0, total)
        return torch.searchsorted(cdf, u, right=True)  # first index with cdf > u: never a zero-probability token


def _prefill(model: nn.Module, texts: list[str], enc: dict):
    """The KV cache of every prompt but its last token, each piece of work done once: the prefix that all
    prompts share (a chat template's system prompt) runs once at batch 1, each distinct prompt's remaining
    tokens run once and are copied to its repeats (samples per prompt). `generate` then runs only the last
    prompt token and the answer. The prompt forward is the costliest step of sampling short answers.

    enc: the tokenizer's left-padded batch (B, Q). Returns None when nothing is shared, else
    (cache, input_ids (B, W), attention_mask (B, W)) in the layout the cache holds, each row
    [shared prefix | padding | rest of its prompt]; position ids skip the padding, so every row computes
    what it would alone (tested).
    """
    unique_of = {text: j for j, text in enumerate(dict.fromkeys(texts))}  # distinct prompts in order
    device = enc["input_ids"].device
    rows = torch.tensor([texts.index(text) for text in unique_of], device=device)  # (U,) first rows
    ids, mask = enc["input_ids"][rows], enc["attention_mask"][rows]  # (U, Q)
    P = shared_prefix_len(ids, mask, 0)  # leaves ≥ 1 token of each prompt outside the prefix
    if P == 0 and len(unique_of) == len(texts):
        return None
    rests = [row[m.bool()][P:] for row, m in zip(ids, mask)]  # each prompt after the prefix
    R = max(len(r) for r in rests)
    layout_ids = ids.new_zeros(len(rests), P + R)
    layout_mask = mask.new_zeros(len(rests), P + R)
    layout_ids[:, :P], layout_mask[:, :P] = ids[0, mask[0].argmax() :][:P], 1
    for b, rest in enumerate(rests):
        layout_ids[b, P + R - len(rest) :], layout_mask[b, P + R - len(rest) :] = rest, 1
    position_ids = (layout_mask.cumsum(-1) - 1).clamp(min=0)
    cache = None
    if P > 0:
        cache = model(input_ids=layout_ids[:1, :P], position_ids=position_ids[:1, :P], use_cache=True).cache
        cache.batch_repeat_interleave(len(rests))
    if R > 1:  # the rest but the last column
        cache = model(input_ids=layout_ids[:, P:-1], attention_mask=layout_mask[:, :-1],
                      position_ids=position_ids[:, P:-1], cache=cache, use_cache=True).cache
    if cache is None:  # every prompt is one token
        return None
    repeats = torch.tensor([unique_of[t] for t in texts], device=device)  # (B,) distinct prompt of each row
    cache.batch_select_indices(repeats)  # (U, ...) -> (B, ...)
    return cache, layout_ids[repeats], layout_mask[repeats]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    with_logprobs: bool = True,
    batch_size: int | None = None,
    value_head: nn.Module | None = None,
    uniforms: torch.Tensor | None = None,
) -> Generation:
    """Sample one answer per text (repeat texts for several samples per prompt).

    `uniforms` (B, max_new_tokens) gives each answer its own random draws (`runs.seeding.sample_uniforms`): the
    answer is then the same whatever batch it is sampled in (and on however many processes); None draws from
    torch's global generator.

    Stops as soon as every sequence of a batch has emitted one of the EOS ids (the tokenizer's and the model's
    generation_config.json's). Log-probs come from the raw logits of the sampling steps divided by the
    temperature: the same numbers a training forward would give, without a second pass (implementation
    detail 6); top-k/top-p only restrict which tokens are drawn. A value head on the policy trunk (shared
    critic) reads the last hidden states of the same steps, saving a forward pass.
    """
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    check_decoding_fields(model)
    eos_ids = eos_token_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    decoding = dict(
        NEUTRAL_DECODING,
        max_new_tokens=max_new_tokens,
        do_sample=False,  # greedy over the sampler's one remaining token
        temperature=None,
        top_k=None,
        top_p=None,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_hidden_states=value_head is not None,
    )
    parts = []
    step = batch_size or len(texts)
    for start in range(0, len(texts), step):
        batch = texts[start : start + step]
        # no special tokens: a chat template writes its own BOS, render_prompt adds it to plain prompts
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        prefill = _prefill(model, batch, enc)
        cache, ids, mask = (None, enc["input_ids"], enc["attention_mask"]) if prefill is None else prefill
        sampler = StepSampler(temperature, top_k, top_p, do_sample, record=with_logprobs,
                              uniforms=None if uniforms is None else uniforms[start : start + step])
        out = model.generate(input_ids=ids, attention_mask=mask, cache=cache,
                             logits_processor=LogitsProcessorList([sampler]), **decoding)
        q = ids.shape[1]
        response_ids = out.sequences[:, q:]  # (b, T)
        logprobs = entropy = values = None
        if with_logprobs:
            logprobs, entropy = torch.stack(sampler.logprobs, 1), torch.stack(sampler.entropy, 1)  # (b, T)
        if value_head is not None:
            # step t's last-layer state at the newest position is the state that predicts answer token t
            hidden = torch.cat([step[-1][:, -1:] for step in out.hidden_states], 1)  # (b, T, H)
            values = value_head(hidden)
        parts.append((enc["input_ids"], enc["attention_mask"], response_ids, logprobs, entropy, values))
    model.train(was_training)

    def cat(i: int, pad: int, left: bool) -> torch.Tensor:
        tensors = [p[i] for p in parts]
        width = max(t.shape[1] for t in tensors)
        padded = []
        for t in tensors:
            fill = t.new_full((t.shape[0], width - t.shape[1]), pad)
            padded.append(torch.cat([fill, t] if left else [t, fill], 1))
        return torch.cat(padded)

    query_ids = cat(0, tokenizer.pad_token_id, left=True)
    query_mask = cat(1, 0, left=True)
    response_ids = cat(2, tokenizer.pad_token_id, left=False)
    mask, has_eos = response_mask_after_eos(response_ids, eos_ids)
    response_ids = torch.where(mask.bool(), response_ids, tokenizer.pad_token_id)
    logprobs = cat(3, 0.0, left=False) * mask if with_logprobs else None
    entropy = cat(4, 0.0, left=False) * mask if with_logprobs else None
    values = cat(5, 0.0, left=False) * mask if value_head is not None else None
    texts_out = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Generation(query_ids, query_mask, response_ids, mask, has_eos, logprobs, entropy, values, texts_out)


@torch.no_grad()
def forward_answers(
    gen: Generation,
    model: nn.Module,
    temperature: float,
    batch_size: int | None = None,
    value_head: nn.Module | None = None,
    with_logits: bool = True,
    vocab_rows: torch.Tensor | None = None,
) -> Forward:
    """Log-probs (and values, with a value head) of a generation's answers under `model`, from forward passes
    over `batch_size` rows at a time with all-padding columns trimmed: the reference's log-probs, a separate
    critic's values. -> Forward with (B, T) log-probs or None and (B, T) values or None, zero after each first
    EOS; with `vocab_rows` (B,) bool also the log-probs over the whole vocabulary on those rows, (B', T, V) in row
    order, zero past each batch's longest answer.
    """
    B, T = gen.response_ids.shape
    mask = gen.response_mask
    logprobs = mask.new_zeros(B, T) if with_logits else None
    values = mask.new_zeros(B, T) if value_head is not None else None
    vocab, done = None, 0
    step = batch_size or B
    for s in (slice(i, i + step) for i in range(0, B, step)):
        i, a, t = gen.trimmed(s)
        rows = vocab_rows[s] if vocab_rows is not None and vocab_rows[s].any() else None
        out = forward_response(model, i, a, t, temperature, value_head, with_logits=with_logits, vocab_rows=rows)
        if logprobs is not None:
            logprobs[s, :t] = out.logprobs
        if values is not None:
            values[s, :t] = out.values
        if rows is not None:
            if vocab is None:
                vocab = out.vocab_logprobs.new_zeros(int(vocab_rows.sum()), T, out.vocab_logprobs.shape[-1])
            vocab[done : done + len(out.vocab_logprobs), :t] = out.vocab_logprobs
            done += len(out.vocab_logprobs)
    return Forward(logprobs * mask if logprobs is not None else None, None,
                   values * mask if values is not None else None, vocab)
