"""What scale needs on one machine: gradient checkpointing leaves the gradient as it was; model FLOPs counted by
hand; the throughput and memory metrics of a run; the 0.5B and 1B shapes built from a config."""

import json

import pytest
import torch

from rlhflab.distributed.throughput import iteration_flops, matmul_weights
from rlhflab.models.loading import RANDOM_SHAPES, load_causal_lm
from rlhflab.pipelines.train import train
from rlhflab.ppo.trainer import PPOTrainer
from rlhflab.runs.seeding import seed_everything


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_does_not_change_the_gradient(tiny_config, tmp_path, lora):
    """One minibatch's gradients of the policy and the separate critic, with and without recomputation."""
    grads = []
    for checkpointing in (False, True):
        tiny_config.train.gradient_checkpointing = checkpointing
        tiny_config.model.lora.enabled = lora
        seed_everything(0)
        trainer = PPOTrainer(tiny_config, tmp_path / str(checkpointing))
        assert trainer.policy.is_activation_checkpointing == checkpointing
        trainer.iteration = 1
        ro = trainer.collect()
        for module in (trainer.policy_forward, *trainer.critic.modules()):
            module.train()
        assert trainer._accumulate(ro, torch.arange(4), train_policy=True) is not None
        named = [*trainer.policy.named_parameters(), *trainer.critic.model.named_parameters()]
        grads.append({name: p.grad.clone() for name, p in named if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_model_flops_count_the_matmul_weights_by_hand():
    model = load_causal_lm("tiny", torch.device("cpu"), torch.float32)  # 2 layers, hidden 64, MLP 128, tied, V=259
    # per layer: q and o 64×64 each, k and v 64×32 each (2 KV heads of 4), MLP 3 × 64×128, 2 norms of 64
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert matmul_weights(model) == 2 * layer + 64 + 259 * 64  # final norm, tied embedding counted as the LM head
    assert matmul_weights(model, lm_head=False) == 2 * layer + 64
    assert iteration_flops(10, sampled_tokens=3, forward_tokens=5, trained_tokens=7, lora=False) == 160 + 6 * 10 * 7
    assert iteration_flops(10, 3, 5, 7, lora=True) == 2 * 10 * 8 + 4 * 10 * 7


def test_a_run_logs_throughput_and_peak_memory(tiny_config, tmp_path):
    train(tiny_config, tmp_path / "run", quiet=True)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["throughput/tokens_per_s"] == row["throughput/tokens_per_s_per_process"] > 0
    assert row["throughput/tflops"] > 0 and 0.1 < row["memory/peak_gib"] < 64
    assert "throughput/mfu" not in row  # a CPU has no data-sheet peak: MFU only where the peak is known


@pytest.mark.parametrize("shape, billions", [("random-qwen2-0.5b", 0.494), ("random-llama-1b", 1.236)])
def test_random_shapes_have_their_models_size(shape, billions):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # the shape only: no memory, no time
        model = AutoModelForCausalLM.from_config(RANDOM_SHAPES[shape]())
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.01)
