"""The forward pass PPO needs: response log-probs, entropy and values in one go, packed rows without
padding; the value head; log-probs and entropy from logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # at temperature 1 skip the division: a pass over (B, T, 49k) and its backward, for nothing
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(token) under softmax(logits / temperature).

    logits (B, T, V), tokens (B, T) -> (B, T). The temperature must be the sampling temperature, or the
    log-probs describe another policy than the one that sampled (implementation detail 3).
    """
    logits = _tempered(logits, temperature)
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) per position: (B, T, V) -> (B, T)."""
    logp = F.log_softmax(_tempered(logits, temperature), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class ValueHead(nn.Module):
    """Scalar value per position from the trunk's last hidden state; zero-initialised output (detail 12)."""

    def __init__(self, hidden_size: int, kind: str = "linear"):
        super().__init__()
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1))
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # fp32 even under bf16 autocast: values feed GAE and the value loss, where bf16's 3 digits would show
        with torch.autocast(hidden.device.type, enabled=False):
            return self.net(hidden.float()).squeeze(-1)  # (B, T)


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns hidden states) and the LM head of any HF causal LM, LoRA-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


@dataclass
class Forward:
    logprobs: torch.Tensor  # (B, T) log π(response token) at the sampling temperature
    entropy: torch.Tensor | None  # (B, T) entropy of π at each response position
    values: torch.Tensor | None  # (B, T) V(state before each response token)
    vocab_logprobs: torch.Tensor | None = None  # (B', T, V) log π over the whole vocabulary on the rows asked for


def forward_response(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    temperature: float,
    value_head: ValueHead | None = None,
    with_logits: bool = True,
    with_entropy: bool = False,
    vocab_rows: torch.Tensor | None = None,
    pack: bool = True,
) -> Forward:
    """One forward pass over prompt+response returning response log-probs (and values, entropy).

    input_ids, attention_mask (B, L) with the prompt left-padded and the response (length T) at the end.
    The LM head runs on the T response positions only: with a 49k vocabulary it would otherwise dominate.
    Position ids skip left padding so padded and unpadded prompts give the same logits (detail 2).
    With `pack` (several rows), the rows run as packed sequences: no padding, and prompt tokens that every
    row starts with (a chat template's system prompt) run once: the same result for less work.
    vocab_rows (B,) bool: the rows whose log-probs over the whole vocabulary to return too, (B', T, V).
    """
    trunk, lm_head = trunk_and_head(model)
    hidden = _packed_response_states(trunk, input_ids, attention_mask, response_len) if pack else None
    if hidden is None:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state  # no KV cache: nothing follows this pass
        hidden = hidden[:, -response_len - 1 : -1]  # (B, T, H): the states that predict each response token
    values = value_head(hidden) if value_head is not None else None
    logprobs = entropy = vocab = None
    if with_logits:
        logits = lm_head(hidden)  # (B, T, V)
        logprobs = logprobs_from_logits(logits, input_ids[:, -response_len:], temperature)
        if with_entropy:
            entropy = entropy_from_logits(logits, temperature)
        if vocab_rows is not None:
            vocab = F.log_softmax(_tempered(logits[vocab_rows], temperature), dim=-1)
    return Forward(logprobs, entropy, values, vocab)


class ResponseForward(nn.Module):
    """A causal LM (and a value head on its states) whose `forward` is `forward_response`: the one module a
    data-parallel engine wraps (DDP, FSDP2), so its hooks see every parameter the PPO loss uses — the policy with
    a shared value head, or a separate critic. Returns (log-probs, entropy, values) (B, T) and the log-probs over
    the vocabulary of the `vocab_rows` (B', T, V), each None unless computed."""

    def __init__(self, model: nn.Module, head: ValueHead | None = None):
        super().__init__()
        self.model, self.head = model, head
        # what Accelerate's FSDP2 preparation reads to pick the layers to shard and the embeddings to group
        self._no_split_modules = getattr(model, "_no_split_modules", None) or getattr(
            getattr(model, "get_base_model", lambda: model)(), "_no_split_modules", None)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @staticmethod
    def example(device: torch.device) -> tuple:
        """Inputs of the smallest forward pass: a 1-token prompt and a 1-token answer."""
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        return ids, torch.ones_like(ids), 1, 1.0

    def forward(self, input_ids, attention_mask, response_len: int, temperature: float, with_logits: bool = True,
                with_entropy: bool = False, vocab_rows: torch.Tensor | None = None):
        out = forward_response(self.model, input_ids, attention_mask, response_len, temperature, self.head,
                               with_logits=with_logits, with_entropy=with_entropy, vocab_rows=vocab_rows)
        return out.logprobs, out.entropy, out.values, out.vocab_logprobs


def shared_prefix_len(input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> int:
    """Number of leading prompt tokens identical in every row (left-padded prompts, answers of length T at
    the end), keeping at least one prompt token of each row outside it. 0 for a single row."""
    q = input_ids.shape[1] - response_len
    lengths = attention_mask[:, :q].sum(1)
    n = int(lengths.min()) - 1
    if len(input_ids) < 2 or n <= 0:
        return 0
    starts = (q - lengths).tolist()
    aligned = torch.stack([input_ids[b, s : s + n] for b, s in enumerate(starts)])  # (B, n)
    same = (aligned == aligned[:1]).all(0)  # (n,)
    return n if bool(same.all()) else int(same.long().argmin())


# Tokens per packed row. Attention over a packed row costs O(length²), mostly on masked pairs: at 256 it is
# ~8 % of a SmolLM2 layer's matmul work, against the 20-30 % of tokens that packing saves.
PACK_TOKENS = 256
# Pack only when it leaves at most this share of the padded batch's tokens: with no shared prefix and
# little padding, the wider masked attention of packed rows costs more than the tokens it saves.
PACK_WHEN_TOKENS_AT_MOST = 0.8


def _packed_response_states(trunk, input_ids, attention_mask, response_len: int) -> torch.Tensor:
    """Last hidden states that predict each response token, computed on packed rows.

    input_ids, attention_mask (B, L): left-padded prompts, answers of length T at the end (right-padded).
    The prefix P shared by all rows is laid out once at the start of each packed row, followed by as many
    rows' remaining real tokens ("segments") as fit in PACK_TOKENS. A block mask lets each segment attend to
    the prefix and causally to itself, and position ids continue from the prefix, so every state equals the
    unpacked one (gradients included) while padding and repeated prefixes cost nothing.
    -> (B, T, H); states at an answer's padding positions are arbitrary (callers mask them); None when
    packing would not save enough tokens (see PACK_WHEN_TOKENS_AT_MOST).
    """
    B, L = input_ids.shape
    if B < 2:
        return None
    T, device = response_len, input_ids.device
    P = shared_prefix_len(input_ids, attention_mask, T)
    real = attention_mask.bool()
    first = real.long().argmax(1).tolist()  # each row's first real column
    prompt_rest = (attention_mask[:, : L - T].sum(1) - P).tolist()  # prompt tokens after the prefix
    answer_len = attention_mask[:, L - T :].sum(1).tolist()
    segments = [input_ids[b, first[b] + P :][real[b, first[b] + P :]] for b in range(B)]
    cap = max(PACK_TOKENS, P + max(len(s) for s in segments))
    bins, where = [[]], []  # rows per packed row; (packed row, offset) of each row's segment
    used = P
    for b, s in enumerate(segments):
        if used + len(s) > cap:
            bins.append([])
            used = P
        where.append((len(bins) - 1, used))
        bins[-1].append(b)
        used += len(s)
    if len(bins) * P + sum(len(s) for s in segments) > PACK_WHEN_TOKENS_AT_MOST * B * L:
        return None
    width = max(P + sum(len(segments[b]) for b in rows) for rows in bins)
    prefix = input_ids[0, first[0] : first[0] + P]
    ids = input_ids.new_full((len(bins), width), 0)
    positions = torch.zeros_like(ids)
    owner = torch.full_like(ids, -2)  # -1 prefix, b segment of row b, -2 padding
    ids[:, :P], positions[:, :P], owner[:, :P] = prefix, torch.arange(P, device=device), -1
    for b, s in enumerate(segments):
        r, o = where[b]
        ids[r, o : o + len(s)] = s
        positions[r, o : o + len(s)] = torch.arange(P, P + len(s), device=device)
        owner[r, o : o + len(s)] = b
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    visible = (owner[:, None, :] == -1) | (owner[:, None, :] == owner[:, :, None])  # (R, query, key)
    mask4d = (causal & visible)[:, None]  # (R, 1, W, W); padding queries see the prefix or earlier padding
    hidden = trunk(input_ids=ids, attention_mask=mask4d, position_ids=positions, use_cache=False).last_hidden_state
    # answer token j of row b is predicted by the state just before it: offset + prompt_rest - 1 + j
    index = torch.empty(B, T, dtype=torch.long, device=device)
    steps = torch.arange(T, device=device)
    for b in range(B):
        r, o = where[b]
        last = max(answer_len[b] - 1, 0)
        index[b] = r * width + o + prompt_rest[b] - 1 + steps.clamp(max=last)
    return hidden.reshape(-1, hidden.shape[-1])[index]  # (B, T, H)
