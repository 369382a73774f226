"""Stage 1 of an iteration: sample answers with the KV cache and record what PPO needs about them.

`generate` is the one entry point for sampling (training rollouts, evaluation, `rlhflab sample`), so another
generation backend can replace it without touching the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from rlhflab.models import forward_response
from rlhflab.ppo_math import entropy_from_logits, logprobs_from_logits


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


@dataclass
class Rollout:
    """One iteration's experience: the generation plus everything scored and estimated about it."""

    gen: Generation
    prompts: list[str]  # (B,) prompt as the reward sees it
    metadata: list[dict]  # (B,) per-prompt fields from the prompt file
    scores: torch.Tensor  # (B,) task score after missing-EOS penalty and normalisation
    raw_scores: torch.Tensor  # (B,) reward as returned, before any of that
    components: dict[str, list[float]]  # reward component -> (B,) values
    ref_logprobs: torch.Tensor  # (B, T) log π_ref(token)
    values: torch.Tensor | None  # (B, T) V(s_t) from the critic before the update
    kl: dict[str, torch.Tensor]  # k1/k2/k3 -> (B, T) per-token KL estimates
    rewards: torch.Tensor | None = None  # (B, T) KL-shaped per-token rewards (critic path)
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T) value targets
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: generate, score, forwards


def response_mask_after_eos(response_ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask that is 1 up to and including the first EOS, 0 after it (implementation detail 4).

    response_ids (B, T) -> (mask (B, T) float, has_eos (B,) bool)
    """
    is_eos = response_ids == eos_id
    after_first = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_first).float(), is_eos.any(1)


def _prefill_unique_prompts(model: nn.Module, texts: list[str], enc: dict):
    """The KV cache of every prompt but its last token, computed once per distinct prompt and copied to its
    repeats (samples per prompt), or None when all prompts differ. `generate` then runs only the last prompt
    token and the answer: the prompt forward is the costliest step of sampling several answers per prompt.
    """
    unique_of = {text: j for j, text in enumerate(dict.fromkeys(texts))}  # distinct prompts in order
    if len(unique_of) == len(texts):
        return None
    device = enc["input_ids"].device
    unique_rows = torch.tensor([texts.index(text) for text in unique_of], device=device)  # (U,) first rows
    ids, mask = enc["input_ids"][unique_rows, :-1], enc["attention_mask"][unique_rows, :-1]  # (U, Q-1)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True).past_key_values
    cache.batch_select_indices(torch.tensor([unique_of[t] for t in texts], device=device))  # (U, ...) -> (B, ...)
    return cache


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
) -> Generation:
    """Sample one answer per text (repeat texts for several samples per prompt).

    Stops as soon as every sequence of a batch has emitted EOS. Log-probs come from the raw logits of the
    sampling steps divided by the temperature: the same numbers a training forward would give, without a
    second pass (implementation detail 6); top-k/top-p only restrict which tokens are drawn. A value head on
    the policy trunk (shared critic) reads the last hidden states of the same steps, saving a forward pass.
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=top_k if do_sample and top_k > 0 else None,
        top_p=top_p if do_sample and top_p < 1.0 else None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        output_logits=with_logprobs,
        output_hidden_states=value_head is not None,
    )
    parts = []
    step = batch_size or len(texts)
    for start in range(0, len(texts), step):
        batch = texts[start : start + step]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items()}
        cache = _prefill_unique_prompts(model, batch, enc)
        out = model.generate(**enc, generation_config=config, past_key_values=cache)
        q = enc["input_ids"].shape[1]
        response_ids = out.sequences[:, q:]  # (b, T)
        logprobs = entropy = values = None
        if with_logprobs:
            logits = torch.stack(out.logits, 1)  # (b, T, V)
            logprobs = logprobs_from_logits(logits, response_ids, temperature)
            entropy = entropy_from_logits(logits, temperature)
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
    mask, has_eos = response_mask_after_eos(response_ids, tokenizer.eos_token_id)
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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Log-probs (and values, with a value head) of a generation's answers under `model`, from forward passes
    over `batch_size` rows at a time with all-padding columns trimmed: the reference's log-probs, a separate
    critic's values. Returns ((B, T) log-probs or None, (B, T) values or None), zero after each first EOS.
    """
    B, T = gen.response_ids.shape
    mask = gen.response_mask
    logprobs = mask.new_zeros(B, T) if with_logits else None
    values = mask.new_zeros(B, T) if value_head is not None else None
    step = batch_size or B
    for s in (slice(i, i + step) for i in range(0, B, step)):
        i, a, t = gen.trimmed(s)
        out = forward_response(model, i, a, t, temperature, value_head, with_logits=with_logits)
        if logprobs is not None:
            logprobs[s, :t] = out.logprobs
        if values is not None:
            values[s, :t] = out.values
    return (logprobs * mask if logprobs is not None else None), (values * mask if values is not None else None)
