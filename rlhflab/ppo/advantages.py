"""From scores to advantages: reward shaping with the KL penalty, GAE, and the critic-free baselines.

Shapes: B = samples, T = response tokens, V = vocabulary, P = prompts, K = samples per prompt. A `mask` is
1.0 on real response tokens (up to and including the first EOS), 0.0 on padding and after EOS.
"""

from __future__ import annotations

import torch

from rlhflab.ppo.stats import masked_mean, masked_whiten


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float | torch.Tensor) -> torch.Tensor:
    """Per-token rewards: −β·KL_t at every response token, plus the score on the last real token.

    scores (B,), kl (B, T), mask (B, T), kl_coef β: one float or (B,) per answer (prompt groups) -> (B, T).
    Implementation detail 7.
    """
    beta = torch.as_tensor(kl_coef, dtype=kl.dtype, device=kl.device).reshape(-1, 1)  # (1, 1) or (B, 1)
    rewards = -beta * kl * mask
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


def normalize_scores(scores: torch.Tensor, has_eos: torch.Tensor, valid: torch.Tensor,
                     missing_eos_penalty: float | None, normalization: str, clip: float | None,
                     group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The task score PPO optimises: missing-EOS penalty, normalisation over the valid samples of each prompt group
    (`whiten`: mean 0 and std 1; `scale`: std 1; a group with fewer than two valid samples keeps its scores),
    clipping; samples left out (a NaN/inf reward) get 0.

    scores, has_eos, valid, group_ids (B,) -> (B,); group_ids None: the batch is one group.
    Per group because groups score on different scales (a retain group's `not:` reward is ≈ 1 on every answer, a
    sky answer earns ~0.5 from a length term alone): whitened together, those offsets would become advantages of
    whole groups until the critic learns them, noise that drowns the rare rewarded answer.
    """
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    scores = apply_missing_eos_penalty(scores, has_eos, missing_eos_penalty)
    if normalization != "none":
        group_ids = torch.zeros_like(scores, dtype=torch.long) if group_ids is None else group_ids
        normalized = scores.clone()
        for g in group_ids.unique():
            rows = (group_ids == g) & valid
            if rows.sum() > 1:
                normalized[rows] = masked_whiten(scores[rows], torch.ones_like(scores[rows]),
                                                 shift_mean=normalization == "whiten")
        scores = normalized
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores * valid


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


def _groups(scores: torch.Tensor, samples_per_prompt: int, valid: torch.Tensor | None):
    """(P, K) scores with invalid members set to 0, and the (P, K) 0/1 validity of each member."""
    v = torch.ones_like(scores) if valid is None else valid.to(scores.dtype)
    s = torch.where(v > 0, scores, torch.zeros_like(scores))
    return s.view(-1, samples_per_prompt), v.view(-1, samples_per_prompt)


def reinforce_advantages(scores: torch.Tensor, samples_per_prompt: int, valid: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """Score minus a mean baseline: the per-prompt mean when K > 1, else the batch mean.

    scores (P*K,), grouped prompt-major ([p0 s0, p0 s1, ..., p1 s0, ...]) -> (P*K,). `valid` (P*K,) bool
    (None: all): invalid samples (a NaN/inf reward) get advantage 0 and are left out of every baseline.
    """
    k = samples_per_prompt if samples_per_prompt > 1 else len(scores)  # K = 1: one group, the batch
    grouped, v = _groups(scores, k, valid)  # (P, K)
    return ((grouped - masked_mean(grouped, v, 1).unsqueeze(1)) * v).flatten()


def rloo_advantages(scores: torch.Tensor, samples_per_prompt: int, valid: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """REINFORCE leave-one-out: each sample's baseline is the mean of the other K−1 samples of its prompt.

    scores (P*K,) prompt-major -> (P*K,). Needs K ≥ 2. `valid` as in `reinforce_advantages`: the baseline is
    the mean of the other valid members; a sample with no other valid member has no baseline and gets 0.
    """
    grouped, v = _groups(scores, samples_per_prompt, valid)  # (P, K)
    others = v.sum(1, keepdim=True) - 1  # (P, 1) other valid members of a valid sample's group
    baseline = (grouped.sum(1, keepdim=True) - grouped) / others.clamp(min=1)
    return ((grouped - baseline) * v * (others > 0)).flatten()


def group_normalized_advantages(scores: torch.Tensor, samples_per_prompt: int, eps: float = 1e-6,
                                valid: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO: (score − mean of its prompt's group) / (std of the group + eps).

    scores (P*K,) prompt-major -> (P*K,). Needs K ≥ 2. `valid` as in `reinforce_advantages`: mean and
    (Bessel-corrected) std over the group's valid members; a lone valid member gets 0.
    """
    grouped, v = _groups(scores, samples_per_prompt, valid)  # (P, K)
    n = v.sum(1, keepdim=True)  # (P, 1)
    centred = (grouped - masked_mean(grouped, v, 1).unsqueeze(1)) * v
    std = ((centred**2).sum(1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
    return (centred / (std + eps)).flatten()
