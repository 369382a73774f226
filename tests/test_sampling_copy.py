"""The bf16 sampling copy (models/sampling_copy.py): it holds the policy's weights (LoRA merged) or the LoRA base's,
follows the policy after every step, and a bf16 run samples from it while its training numbers come from the
policy's own forwards."""

import pytest
import torch

from rlhflab.models.loading import add_lora, load_causal_lm
from rlhflab.models.sampling_copy import SamplingCopy
from rlhflab.ppo.trainer import PPOTrainer
from rlhflab.runs.tracking import Tracker

IDS = torch.tensor([[5, 17, 42, 8, 99, 3]])  # (1, T) any tokens of the tiny model


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _train_adapters(policy) -> None:
    """Move every LoRA weight as an optimizer step would (B starts at 0, so the adapters start as no-ops)."""
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)


def test_lora_copy_is_the_merged_policy_and_follows_it():
    torch.manual_seed(0)
    policy = add_lora(load_causal_lm("tiny", torch.device("cpu"), torch.float32), 4, 8, "all-linear")
    copy = SamplingCopy(policy, dtype=torch.float32)  # fp32 so the comparison is exact up to rounding
    _train_adapters(policy)
    assert not torch.allclose(_logits(copy.refresh(merged=False)), _logits(policy), atol=1e-3)  # adapters matter
    assert torch.allclose(_logits(copy.refresh()), _logits(policy), atol=1e-5)
    with policy.disable_adapter():
        assert torch.allclose(_logits(copy.refresh(merged=False)), _logits(policy), atol=1e-5)
    _train_adapters(policy)  # the next iteration's policy
    assert torch.allclose(_logits(copy.refresh()), _logits(policy), atol=1e-5)
    assert not any(p.requires_grad for p in copy.model.parameters())


def test_full_fine_tune_copy_follows_every_trained_weight():
    policy = load_causal_lm("tiny", torch.device("cpu"), torch.float32)
    copy = SamplingCopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01)
    assert next(copy.model.parameters()).dtype == torch.bfloat16
    assert torch.allclose(_logits(copy.refresh()), _logits(policy), atol=0.05)  # bf16 weights: close, not equal
    assert set(copy.samplers()) == {"policy"}  # its reference is a separate frozen model
    with pytest.raises(ValueError, match="reference"):
        copy.refresh(merged=False)


@pytest.mark.parametrize(("dtype", "enabled", "expected"), [
    ("bf16-autocast", True, True), ("float32", True, False), ("bf16-autocast", False, False),
])
def test_a_run_samples_from_the_copy_only_where_it_computes_in_bf16(tiny_config, tmp_path, dtype, enabled, expected):
    tiny_config.model.dtype = dtype
    tiny_config.model.lora.enabled = True
    tiny_config.rollout.sampling_copy = enabled
    trainer = PPOTrainer(tiny_config, tmp_path)
    assert (trainer.sampling_copy is not None) is expected


def test_a_bf16_lora_run_samples_from_the_copy(tiny_config, tmp_path, monkeypatch):
    """The rollout's tokens come from the copy holding the current policy; its first ratio is still 1 (the old
    log-probs come from the policy's own forward, not from the sampling pass)."""
    tiny_config.model.dtype = "bf16-autocast"
    tiny_config.model.lora.enabled = True
    tiny_config.model.critic = "shared"  # its values must come from the recomputing forward, not the sampler
    trainer = PPOTrainer(tiny_config, tmp_path)
    sampled_from = []
    refresh = trainer.sampling_copy.refresh
    monkeypatch.setattr(trainer.sampling_copy, "refresh",
                        lambda merged=True: sampled_from.append(merged) or refresh(merged))
    tracker = Tracker(tmp_path, [], "t", "t", {})
    rows = [trainer.iteration_step(tracker) for _ in range(2)]
    assert sampled_from == [True, True]
    for row in rows:
        assert row["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=2e-3)
        assert torch.isfinite(torch.tensor(row["loss/value"]))


def test_train_says_it_samples_from_the_copy(tiny_config, tmp_path, capsys):
    from rlhflab.pipelines.train import train

    tiny_config.model.dtype = "bf16-autocast"
    tiny_config.train.iterations = 1
    train(tiny_config, tmp_path / "run")
    assert "precision: bf16 autocast" in (err := capsys.readouterr().err) and "sampling from a bf16 copy" in err
