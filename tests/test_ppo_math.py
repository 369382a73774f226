"""The math of PPO against hand-computed values and plain-loop references."""

import math

import pytest
import torch

from rlhflab.models.forward import entropy_from_logits, logprobs_from_logits
from rlhflab.ppo.advantages import (
    apply_missing_eos_penalty,
    gae,
    group_normalized_advantages,
    normalize_scores,
    reinforce_advantages,
    rloo_advantages,
    shape_rewards,
)
from rlhflab.ppo.kl import adaptive_kl_coef, kl_estimators
from rlhflab.ppo.losses import loss_denominator, loss_weights, policy_loss, value_loss
from rlhflab.ppo.rollout import response_mask_after_eos
from rlhflab.ppo.stats import explained_variance, finite_rows, masked_mean, masked_var, masked_whiten
from rlhflab.rewards.reward_model import bradley_terry_loss


def test_logprobs_from_logits_uses_temperature():
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])  # (1, 1, 3)
    tokens = torch.tensor([[2]])
    t = 2.0
    z = [1 / t, 2 / t, 3 / t]
    expected = z[2] - math.log(sum(math.exp(v) for v in z))
    assert logprobs_from_logits(logits, tokens, t).item() == pytest.approx(expected, abs=1e-6)


def test_entropy_uniform_is_log_v():
    logits = torch.zeros(2, 3, 8)
    assert torch.allclose(entropy_from_logits(logits), torch.full((2, 3), math.log(8)))


def test_masked_mean_var_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # unbiased: ((1)+(0)+(1))/2
    w = masked_whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)
    assert w[0, 3].item() == 0.0
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(2.0, abs=1e-5)


def test_kl_estimators_hand_values():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    kl = kl_estimators(lp, ref)
    assert kl["k1"][0].tolist() == pytest.approx([0.5, -1.0])
    assert kl["k2"][0].tolist() == pytest.approx([0.125, 0.5])
    # k3 = (r - 1) - log r with r = exp(ref - lp)
    k3 = [(math.exp(-0.5) - 1) + 0.5, (math.exp(1.0) - 1) - 1.0]
    assert kl["k3"][0].tolist() == pytest.approx(k3, abs=1e-6)


def test_k3_is_nonnegative():
    torch.manual_seed(0)
    lp, ref = torch.randn(64, 32) * 3, torch.randn(64, 32) * 3
    assert (kl_estimators(lp, ref)["k3"] >= 0).all()


def test_shape_rewards_puts_score_on_last_real_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = shape_rewards(scores, kl, mask, kl_coef=0.5)
    assert r.flatten().tolist() == pytest.approx([-0.05, -0.1, -0.15 + 1.0, -0.25, -0.25 + 2.0, 0.0])


def test_missing_eos_penalty():
    s = apply_missing_eos_penalty(torch.tensor([1.0, 0.5]), torch.tensor([True, False]), -1.0)
    assert s.tolist() == [1.0, -1.0]
    assert apply_missing_eos_penalty(torch.tensor([0.5]), torch.tensor([False]), None).tolist() == [0.5]


def test_normalize_scores_hand_values():
    """Penalty, then normalisation over the valid samples only, then clipping; left-out samples are 0."""
    scores, eos = torch.tensor([3.0, 1.0, float("nan"), 2.0]), torch.tensor([True, True, True, False])
    valid = torch.isfinite(scores)
    # penalty: [3, 1, 0, -1] over valid [3, 1, -1]: mean 1, unbiased std 2
    out = normalize_scores(scores, eos, valid, -1.0, "whiten", None)
    assert out.tolist() == pytest.approx([1.0, 0.0, 0.0, -1.0], abs=1e-6)
    # scale: (x − mean) / std + mean, the mean kept
    assert normalize_scores(scores, eos, valid, -1.0, "scale", None).tolist() == pytest.approx([2, 1, 0, 0], abs=1e-6)
    assert normalize_scores(scores, eos, valid, None, "none", 1.5).tolist() == [1.5, 1.0, 0.0, 1.5]


def test_adaptive_kl_update_hand_values():
    # KL above target by 50 % → error clipped to +0.2; n/horizon = 0.5 → β·1.1
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 100, 50) == pytest.approx(0.11)
    # KL 5 % below target → error −0.05 → β·(1 − 0.05·0.5)
    assert adaptive_kl_coef(0.1, 5.7, 6.0, 100, 50) == pytest.approx(0.1 * (1 - 0.025))


def _gae_loop(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_v - values[b, t].item()
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv


def test_gae_matches_plain_loop_with_padding():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] + [0.0] * 5])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert torch.allclose(adv, _gae_loop(rewards, values, mask, 0.9, 0.8), atol=1e-5)
    assert torch.allclose(ret, (adv + values) * mask, atol=1e-6)


def test_gae_hand_values():
    # γ = 1, λ = 1: advantage = sum of future rewards − V(s_t)
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 0.75]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.75, 0.25])


def test_critic_free_estimators_hand_values():
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0])  # P = 2 prompts × K = 3
    assert reinforce_advantages(scores, 3).tolist() == pytest.approx(
        [2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0])
    assert reinforce_advantages(torch.tensor([1.0, 3.0]), 1).tolist() == [-1.0, 1.0]
    # RLOO: baseline = mean of the other two
    assert rloo_advantages(scores, 3).tolist() == pytest.approx([1.0, -0.5, -0.5, -3.0, 0.0, 3.0])
    grpo = group_normalized_advantages(scores, 3)
    std0 = torch.tensor([1.0, 0.0, 0.0]).std().item()
    assert grpo[:3].tolist() == pytest.approx([(2 / 3) / std0, (-1 / 3) / std0, (-1 / 3) / std0], abs=1e-4)
    assert grpo[3:].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-4)


def test_critic_free_estimators_leave_invalid_samples_out_by_hand():
    """A sample with a NaN reward gets advantage 0 and is in no baseline: a group's stats use its valid members."""
    nan = float("nan")
    scores = torch.tensor([1.0, nan, 3.0, 2.0, 4.0, 6.0])  # P = 2 × K = 3; sample 1 has no reward
    valid = torch.isfinite(scores)
    assert reinforce_advantages(scores, 3, valid).tolist() == pytest.approx([-1.0, 0.0, 1.0, -2.0, 0.0, 2.0])
    assert reinforce_advantages(scores, 1, valid).tolist() == pytest.approx([-2.2, 0.0, -0.2, -1.2, 0.8, 2.8])
    # RLOO: group 0's baselines are the one other valid member (3, then 1)
    assert rloo_advantages(scores, 3, valid).tolist() == pytest.approx([-2.0, 0.0, 2.0, -3.0, 0.0, 3.0])
    # GRPO: group 0 is {1, 3}: mean 2, std √2; group 1 {2, 4, 6}: mean 4, std 2
    grpo = group_normalized_advantages(scores, 3, valid=valid)
    assert grpo.tolist() == pytest.approx([-2**-0.5, 0.0, 2**-0.5, -1.0, 0.0, 1.0], abs=1e-5)
    # a lone valid member has no baseline: 0, not NaN
    lone, lone_valid = torch.tensor([5.0, nan]), torch.tensor([True, False])
    for estimator in (rloo_advantages, group_normalized_advantages, reinforce_advantages):
        assert estimator(lone, 2, valid=lone_valid).tolist() == [0.0, 0.0]


def test_finite_rows_and_denominator_of_dropped_samples():
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 1.0], [2.0, 3.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # row 0's NaN is padding
    assert finite_rows(x, mask).tolist() == [True, False, True]
    dropped = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])  # row 1 left out of the update
    assert loss_denominator(dropped, "sequence").item() == 2.0
    assert loss_denominator(dropped, "token").item() == 3.0


def test_policy_loss_clipping_and_clipfrac():
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]]))
    loss, stats = policy_loss(new, old, adv, mask, clip_range=0.2)
    # per token: max(−A·r, −A·clip(r)) = [−1.2, −0.5, 1.5, 0.8]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)  # tokens 0 and 3 are clipped


def test_clipfrac_zero_and_ratio_one_at_start():
    lp = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    _, stats = policy_loss(lp, lp.clone(), torch.randn(3, 5), mask, 0.2)
    assert stats["clipfrac"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["approxkl"].item() == 0.0


def test_dual_clip_bounds_negative_advantage_loss():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[10.0, 10.0]]))
    adv = torch.tensor([[-1.0, 1.0]])
    mask = torch.ones(1, 2)
    plain, _ = policy_loss(new, old, adv, mask, 0.2)
    dual, _ = policy_loss(new, old, adv, mask, 0.2, dual_clip=3.0)
    # negative advantage: plain = max(10, 1.2) = 10; dual = min(10, 3) = 3. Positive: −1.2 both.
    assert plain.item() == pytest.approx((10 - 1.2) / 2)
    assert dual.item() == pytest.approx((3 - 1.2) / 2)


def test_value_loss_clipping():
    values = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    mask = torch.ones(1, 2)
    loss, clipfrac = value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: unclipped (1−2)² = 1, clipped (0.2−2)² = 3.24 → 3.24; token 1: (0−1)² = 1 both
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert clipfrac.item() == pytest.approx(0.5)
    unclipped, _ = value_loss(values, old, returns, mask, None)
    assert unclipped.item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)
    huber, _ = value_loss(values, old, torch.tensor([[4.0, 0.5]]), mask, None, kind="huber")
    assert huber.item() == pytest.approx(0.5 * ((3 - 0.5) + 0.5 * 0.25) / 2)


def test_masks_ignore_padding_in_losses():
    lp, old, adv = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    base, _ = policy_loss(lp, old, adv, mask, 0.2)
    junk = torch.where(mask.bool(), lp, torch.full_like(lp, 50.0))
    assert policy_loss(junk, old, adv, mask, 0.2)[0].item() == pytest.approx(base.item())


def test_loss_weights_hand_values():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # answers of 2 and 1 tokens
    assert loss_denominator(mask, "token").item() == 3.0
    assert loss_denominator(mask, "sequence").item() == 2.0
    token = loss_weights(mask, "token", loss_denominator(mask, "token"))
    assert torch.allclose(token, torch.tensor([[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]]))
    sequence = loss_weights(mask, "sequence", loss_denominator(mask, "sequence"))
    # each answer's token mean, averaged over the 2 answers: 1/(2·2) per token of the first, 1/(1·2) for the second
    assert sequence.tolist() == [[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]]
    # a given (e.g. global, over processes) denominator is used as given
    given = loss_weights(mask, "token", torch.tensor(6.0))
    assert torch.allclose(given, torch.tensor([[1 / 6, 1 / 6, 0.0], [1 / 6, 0.0, 0.0]]))


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_weighted_losses_add_up_over_micro_batches(normalization):
    """Micro-batch losses weighted with the minibatch's denominator sum to the whole minibatch's loss."""
    torch.manual_seed(0)
    lp, old, adv, v, v_old, ret = (torch.randn(4, 5) for _ in range(6))
    mask = (torch.arange(5) < torch.tensor([[5], [1], [3], [2]])).float()  # lengths 5, 1, 3, 2
    d = loss_denominator(mask, normalization)

    def losses(rows):
        w = loss_weights(mask[rows], normalization, d)
        pg, stats = policy_loss(lp[rows], old[rows], adv[rows], mask[rows], 0.2, weights=w)
        vl, _ = value_loss(v[rows], v_old[rows], ret[rows], mask[rows], 0.2, weights=w)
        return torch.stack([pg, vl, stats["approxkl"]])

    whole = losses(slice(0, 4))
    assert sum(losses(slice(i, i + 1)) for i in range(4)) == pytest.approx(whole, abs=1e-6)
    assert losses(slice(0, 2)) + losses(slice(2, 4)) == pytest.approx(whole, abs=1e-6)
    # the policy loss by hand: per-token losses, then token- or sequence-normalised
    per_token = torch.max(-adv * torch.exp(lp - old), -adv * torch.clamp(torch.exp(lp - old), 0.8, 1.2))
    if normalization == "token":
        expected = (per_token * mask).sum() / mask.sum()
    else:
        expected = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    assert whole[0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_response_mask_after_first_eos():
    eos = 9
    ids = torch.tensor([[1, 2, 9, 3, 9], [1, 2, 3, 4, 5], [9, 1, 1, 1, 1]])
    mask, has_eos = response_mask_after_eos(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 2.0), returns, mask).item() == pytest.approx(0.0)


def test_bradley_terry_loss_hand_values():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    loss, acc = bradley_terry_loss(chosen, rejected)
    expected = (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert acc.item() == 0.5
    loss_m, _ = bradley_terry_loss(chosen, rejected, margin=1.0)
    assert loss_m.item() > loss.item()
