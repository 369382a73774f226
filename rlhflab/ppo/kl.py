"""KL between policy and reference: per-token estimators and the adaptive coefficient.

Shapes: B = samples, T = response tokens, V = vocabulary, P = prompts, K = samples per prompt. A `mask` is
1.0 on real response tokens (up to and including the first EOS), 0.0 on padding and after EOS.
"""

from __future__ import annotations

import torch


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


def adaptive_kl_coef(kl_coef: float, observed_kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Ziegler et al. (2019) proportional controller: β ← β·(1 + clip((KL − target)/target, ±0.2)·n/horizon)."""
    error = max(-0.2, min(0.2, observed_kl / target - 1.0))
    return kl_coef * (1.0 + error * n_steps / horizon)


