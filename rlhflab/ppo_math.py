"""The math of PPO for language models, and of preference reward models: pure torch functions.

No models, devices or config objects here. Shapes: B = samples, T = response tokens, V = vocabulary,
P = prompts, K = samples per prompt. A `mask` is 1.0 on real response tokens (up to and including the
first EOS) and 0.0 on padding and everything after EOS.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------
# log-probs, entropy, masked statistics


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


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (over all, or along `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over positions where mask is 1 (Bessel-corrected when unbiased)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over masked positions; with shift_mean=False only the scale changes (the mean is kept).

    Masked-out positions come back as 0 so they cannot leak into later sums.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---------------------------------------------------------------------------------------------------
# KL to the reference and reward shaping


def kl_estimators(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimators of KL(π || π_ref) from samples of π (Schulman's k1, k2, k3).

    logprobs, ref_logprobs (B, T) -> dict of (B, T):
      k1 = log π − log π_ref                  unbiased, can be negative per sample
      k2 = ½ (log π − log π_ref)²             biased, ≥ 0
      k3 = (r − 1) − log r,  r = π_ref / π    unbiased, ≥ 0, lower variance
    """
    log_ratio = logprobs - ref_logprobs
    return {
        "k1": log_ratio,
        "k2": 0.5 * log_ratio**2,
        "k3": torch.expm1(-log_ratio) + log_ratio,
    }


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: −β·KL_t at every response token, plus the score on the last real token.

    scores (B,), kl (B, T), mask (B, T) -> (B, T). Implementation detail 7.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Replace the score of answers that never emitted EOS by a fixed low score (the "EOS trick").

    scores (B,), has_eos (B,) bool -> (B,). Implementation detail 5.
    """
    if penalty is None:
        return scores
    return torch.where(has_eos, scores, torch.full_like(scores, penalty))


def adaptive_kl_coef(kl_coef: float, observed_kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Ziegler et al. (2019) proportional controller: β ← β·(1 + clip((KL − target)/target, ±0.2)·n/horizon)."""
    error = max(-0.2, min(0.2, observed_kl / target - 1.0))
    return kl_coef * (1.0 + error * n_steps / horizon)


# ---------------------------------------------------------------------------------------------------
# advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a right-padded response.

    rewards, values, mask (B, T) -> advantages (B, T), returns (B, T), both 0 where mask is 0.
    The value after the last real token is 0 (the episode ends there).
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
    return advantages, (advantages + values) * mask


def reinforce_advantages(scores: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """Score minus a mean baseline: the per-prompt mean when K > 1, else the batch mean.

    scores (P*K,), grouped prompt-major ([p0 s0, p0 s1, ..., p1 s0, ...]) -> (P*K,)
    """
    if samples_per_prompt > 1:
        grouped = scores.view(-1, samples_per_prompt)  # (P, K)
        return (grouped - grouped.mean(1, keepdim=True)).flatten()
    return scores - scores.mean()


def rloo_advantages(scores: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """REINFORCE leave-one-out: each sample's baseline is the mean of the other K−1 samples of its prompt.

    scores (P*K,) prompt-major -> (P*K,). Needs K ≥ 2.
    """
    k = samples_per_prompt
    grouped = scores.view(-1, k)  # (P, K)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).flatten()


def group_normalized_advantages(scores: torch.Tensor, samples_per_prompt: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (score − mean of its prompt's group) / (std of the group + eps).

    scores (P*K,) prompt-major -> (P*K,). Needs K ≥ 2.
    """
    grouped = scores.view(-1, samples_per_prompt)  # (P, K)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).flatten()


# ---------------------------------------------------------------------------------------------------
# losses


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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over masked positions: 1 is perfect, 0 is no better than a constant, < 0 worse."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference loss −log σ(r_chosen − r_rejected − margin), mean; and the accuracy (r_chosen > r_rejected).

    chosen, rejected (B,) -> (loss, accuracy).
    """
    diff = chosen - rejected
    return -F.logsigmoid(diff - margin).mean(), (diff > 0).float().mean()
