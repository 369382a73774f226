"""PPO losses: the clipped surrogate for the policy and the clipped value loss.

Shapes: B = samples, T = response tokens, V = vocabulary, P = prompts, K = samples per prompt. A `mask` is
1.0 on real response tokens (up to and including the first EOS), 0.0 on padding and after EOS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhflab.ppo.stats import masked_mean


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate, to minimise: −min(r·A, clip(r, 1±ε)·A), masked mean.

    logprobs, old_logprobs, advantages, mask (B, T) -> (loss, stats).
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
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "approxkl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": (ratio * mask).max(),
        }
    return masked_mean(loss, mask), stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None,
    kind: str = "mse",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO2-style clipped value loss: ½·max(ℓ(V, R), ℓ(V_old + clip(V − V_old, ±ε_v), R)), masked mean.

    values, old_values, returns, mask (B, T) -> (loss, clipfrac). ℓ is squared error ("mse") or Huber.
    """

    def err(v: torch.Tensor) -> torch.Tensor:
        if kind == "huber":
            return F.huber_loss(v, returns, reduction="none", delta=1.0)
        return (v - returns) ** 2

    loss_unclipped = err(values)
    if clip_range_value is None:
        return 0.5 * masked_mean(loss_unclipped, mask), torch.zeros(())
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_clipped = err(clipped)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask).detach()
    return 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask), clipfrac
