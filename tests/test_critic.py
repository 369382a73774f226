"""The PPO update on the tiny model: critic kinds, warm-up, loss normalisation, the KL term, early stops."""

import pytest
import torch

from rlhflab.config import config_from_dict
from rlhflab.errors import UserError
from rlhflab.ppo.critic import SeparateCritic, SharedHeadCritic
from rlhflab.ppo.losses import loss_denominator
from rlhflab.ppo.trainer import PPOTrainer
from rlhflab.runs.tracking import Tracker


def _set(section, **values):
    for k, v in values.items():
        setattr(section, k, v)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _moved(params, before):
    return [not torch.equal(p, b) for p, b in zip(params, before)]


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_warmup_steps_the_critic_and_not_the_policy(tiny_config, tmp_path, critic):
    tiny_config.model.critic = critic
    tiny_config.ppo.critic_warmup_iterations = 1
    trainer = PPOTrainer(tiny_config, tmp_path)
    assert isinstance(trainer.critic, {"shared": SharedHeadCritic, "separate": SeparateCritic}[critic])
    policy0, critic0 = _snapshot(trainer.policy_params), _snapshot(trainer.critic.parameters())
    lr0 = trainer.policy_sched.get_last_lr()
    tracker = Tracker(tmp_path, [], "t", "t", {})
    row = trainer.iteration_step(tracker)
    assert not any(_moved(trainer.policy_params, policy0)), "the policy moved during critic warm-up"
    assert all(_moved(trainer.critic.head.parameters(), critic0[:2] if critic == "shared" else critic0[-2:]))
    assert trainer.policy_sched.last_epoch == 0 and trainer.policy_sched.get_last_lr() == lr0
    assert not trainer.policy_opt.state  # never stepped
    assert row["policy/optimizer_steps"] == 0.0
    trainer.iteration_step(tracker)  # warm-up over: the policy learns
    assert all(_moved(trainer.policy_params, policy0))
    assert trainer.policy_sched.last_epoch == trainer.optimizer_steps(1)


def test_warmup_without_a_critic_is_a_config_error(tiny_config):
    raw = tiny_config.model_dump()
    raw["ppo"].update(advantage_estimator="grpo", critic_warmup_iterations=2)
    with pytest.raises(UserError, match="critic_warmup_iterations"):
        config_from_dict(raw)


def _mixed_length_rollout(trainer):
    """A collected rollout whose 8 answers are cut to 8 different lengths."""
    ro = trainer.collect()
    lengths = torch.arange(1, 9)
    cut = (torch.arange(ro.gen.response_mask.shape[1]) < lengths[:, None]).float()
    ro.gen.response_mask = ro.gen.response_mask * cut
    assert sorted(ro.gen.response_mask.sum(1).tolist()) == lengths.float().tolist()
    ro.advantages = torch.randn_like(ro.advantages) * ro.gen.response_mask
    return ro


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_gradients_do_not_depend_on_micro_batch_size(tiny_config, tmp_path, normalization):
    """1×8, 2×4 and 8×1 micro-batches of mixed-length answers give the same gradients (policy, KL, entropy and
    value terms, on a shared trunk)."""
    tiny_config.model.critic = "shared"
    tiny_config.rollout.max_new_tokens = 8
    _set(tiny_config.ppo, kl_in="loss", kl_estimator="k3", entropy_coef=0.01, loss_normalization=normalization,
                           minibatch_size=8, micro_batch_size=8)
    trainer = PPOTrainer(tiny_config, tmp_path, reward=lambda p, c, m: [float(len(x)) for x in c])
    ro = _mixed_length_rollout(trainer)
    params = trainer.policy_params + trainer.critic.parameters()
    rows = torch.randperm(8)
    denominator = loss_denominator(ro.gen.response_mask[rows], normalization)
    grads = {}
    for micro in (8, 4, 1):
        for p in params:
            p.grad = None
        for m in range(0, 8, micro):
            terms, _ = trainer.loss_terms(ro, rows[m : m + micro], denominator)
            trainer.total_loss(terms, train_policy=True).backward()
        grads[micro] = torch.cat([p.grad.flatten() for p in params])
    assert grads[8].abs().max() > 1e-3
    assert (grads[4] - grads[8]).abs().max() <= 1e-6
    assert (grads[1] - grads[8]).abs().max() <= 1e-6


@pytest.mark.parametrize("estimator, used", [("k1", "k1"), ("k2", "k2"), ("k3", "k3"), (None, "k3")])
def test_kl_in_loss_uses_the_configured_estimator(tiny_config, tmp_path, estimator, used):
    _set(tiny_config.ppo, advantage_estimator="grpo", kl_in="loss", kl_estimator=estimator)
    assert tiny_config.ppo.optimized_kl_estimator == used  # None: k3 in the loss
    trainer = PPOTrainer(tiny_config, tmp_path)
    ro = trainer.collect()
    mask = ro.gen.response_mask
    ro.ref_logprobs = (ro.gen.logprobs - 0.5) * mask  # log π − log π_ref = 0.5 on every token
    expected = {"k1": 0.5, "k2": 0.5 * 0.5**2, "k3": torch.tensor(-0.5).expm1().item() + 0.5}[used]
    rows = torch.arange(8)
    terms, _ = trainer.loss_terms(ro, rows, loss_denominator(mask, "token"))
    assert terms["kl"].item() == pytest.approx(expected, abs=1e-4)  # the policy still equals the sampler
    trainer.iteration = 1
    assert trainer.update(ro)["loss/kl"] > 0


@pytest.mark.parametrize("check, steps", [("after_epoch", 2.0), ("before_step", 1.0)])
def test_approx_kl_early_stop(tiny_config, tmp_path, check, steps):
    """With a tiny target, `after_epoch` finishes the first epoch (2 minibatches) and stops; `before_step`
    steps the first minibatch (still at the old policy) and stops at the second, unstepped."""
    _set(tiny_config.ppo, advantage_estimator="grpo", target_approx_kl=1e-7, approx_kl_check=check)
    trainer = PPOTrainer(tiny_config, tmp_path)
    row = trainer.iteration_step(Tracker(tmp_path, [], "t", "t", {}))
    assert row["policy/epochs"] == 1.0
    assert row["policy/optimizer_steps"] == steps


def test_kl_estimator_default_is_k1_in_the_reward(tiny_config):
    assert tiny_config.ppo.kl_estimator is None and tiny_config.ppo.optimized_kl_estimator == "k1"


def test_whitening_default_depends_on_the_estimator(tiny_config):
    assert tiny_config.ppo.whitens_advantages  # gae
    tiny_config.ppo.advantage_estimator = "grpo"
    assert not tiny_config.ppo.whitens_advantages  # already normalised per group
    tiny_config.ppo.whiten_advantages = True
    assert tiny_config.ppo.whitens_advantages
