"""PPO losses: the clipped surrogate for the policy, the clipped value loss, and the per-token weights that
normalise every loss term of a minibatch the same way whatever its micro-batch split.

Shapes: B = samples, T = response tokens, V = vocabulary, P = prompts, K = samples per prompt. A `mask` is
1.0 on real response tokens (up to and including the first EOS), 0.0 on padding and after EOS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhflab.ppo.stats import masked_sum


def loss_denominator(mask: torch.Tensor, normalization: str) -> torch.Tensor:
    """The count a minibatch's summed loss is divided by: its response tokens (`token`) or answers (`sequence`).

    mask (B, T) of the whole minibatch -> scalar. Computed once per minibatch, before its micro-batches, so
    a multi-process run can pass the sum over processes to `loss_weights` instead. Answers dropped from the
    update (a NaN/inf reward: their mask row is all 0) count in neither.
    """
    if normalization == "token":
        return mask.sum().clamp(min=1.0)
    return (mask.sum(1) > 0).sum().clamp(min=1).to(mask.dtype)


def loss_weights(mask: torch.Tensor, normalization: str, denominator: torch.Tensor | float) -> torch.Tensor:
    """Per-token weights w such that Σ w·x over all micro-batches of a minibatch is its normalised loss.

    mask (b, T) of one micro-batch -> (b, T).
      token     w = m / D, D = response tokens of the minibatch: every token weighs the same
      sequence  w = m / (|answer| · D), D = answers of the minibatch: each answer's token mean, averaged
    The split into micro-batches does not change Σ w·x, so neither does it change the gradient.
    """
    if normalization == "token":
        return mask / denominator
    return mask / (mask.sum(1, keepdim=True).clamp(min=1.0) * denominator)


def _mean_weights(mask: torch.Tensor) -> torch.Tensor:
    return mask / mask.sum().clamp(min=1.0)  # the masked mean over these tokens


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    dual_clip: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate, to minimise: −min(r·A, clip(r, 1±ε)·A), summed with `weights`.

    logprobs, old_logprobs, advantages, mask, weights (B, T) -> (loss, stats). weights: from `loss_weights`
    (None: the masked mean over these tokens); clipfrac, approxkl and ratio_mean use the same weights, so
    micro-batch stats add up to the minibatch's.
    dual_clip c > 1 (Ye et al. 2020) additionally bounds the loss of negative-advantage tokens at −c·A, so a
    huge ratio on a bad token cannot produce an unbounded update (seed 003, appendix 2).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.max(loss_unclipped, loss_clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)
    w = _mean_weights(mask) if weights is None else weights
    with torch.no_grad():
        stats = {
            "clipfrac": masked_sum((loss_clipped > loss_unclipped).float(), w),
            "approxkl": masked_sum(0.5 * log_ratio**2, w),
            "ratio_mean": masked_sum(ratio, w),
            "ratio_max": (ratio * mask).max(),
        }
    return masked_sum(loss, w), stats


def vocab_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Exact KL(π‖π_ref) at each position, summed over the whole vocabulary.

    logprobs, ref_logprobs (B, T, V) log-softmaxed -> (B, T). Unlike the sampled estimators (ppo/kl.py) it sees
    every token, the ones no answer sampled too: a retain group's rising "red" counts before any answer says it.
    """
    return (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None,
    kind: str = "mse",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO2-style clipped value loss: ½·max(ℓ(V, R), ℓ(V_old + clip(V − V_old, ±ε_v), R)), summed with `weights`.

    values, old_values, returns, mask, weights (B, T) -> (loss, clipfrac). ℓ is squared error ("mse") or
    Huber; weights as in `policy_loss` (None: the masked mean).
    """
    w = _mean_weights(mask) if weights is None else weights

    def err(v: torch.Tensor) -> torch.Tensor:
        if kind == "huber":
            return F.huber_loss(v, returns, reduction="none", delta=1.0)
        return (v - returns) ** 2

    loss_unclipped = err(values)
    if clip_range_value is None:
        return 0.5 * masked_sum(loss_unclipped, w), torch.zeros(())
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_clipped = err(clipped)
    clipfrac = masked_sum((loss_clipped > loss_unclipped).float(), w).detach()
    return 0.5 * masked_sum(torch.max(loss_unclipped, loss_clipped), w), clipfrac
