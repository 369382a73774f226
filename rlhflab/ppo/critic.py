"""The critic V(s_t) behind one small interface, in three kinds: none (critic-free estimators), a value head
on the policy trunk (`model.critic: shared`), or a separate value model (`model.critic: separate`, optionally
started from a reward model).

The trainer asks a critic for: the head generation should apply to the policy's hidden states (`policy_head`),
the rollout's values, the values of a micro-batch in the update, its parameters and optimizer, one optimizer
step, and its checkpoint state. It never asks which kind it has.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhflab.distributed.processes import Processes
from rlhflab.distributed.throughput import matmul_weights
from rlhflab.errors import UserError
from rlhflab.models.forward import Forward, ResponseForward, ValueHead
from rlhflab.ppo.rollout import Generation, forward_answers


class Critic:
    """No critic: critic-free advantage estimators (REINFORCE, RLOO, GRPO) build and step no value model."""

    head: ValueHead | None = None
    policy_head: ValueHead | None = None  # a head generation and policy forwards apply to the policy's states
    loss_coef = 0.0  # weight of the value loss in the summed loss
    optimizer: torch.optim.Optimizer | None = None
    scheduler = None

    def parameters(self) -> list[nn.Parameter]:
        """What the critic's optimizer steps (after `wrap`: sharded ones are the shards)."""
        return list(self.head.parameters()) if self.head is not None else []

    def wrap(self, processes: Processes) -> None:
        """Prepare a value model of its own for data-parallel training (DDP / FSDP2), before its optimizer."""

    def modules(self) -> list[nn.Module]:
        """Wrapped modules of its own (the trainer gathers FSDP2 shards of them for the rollout)."""
        return []

    def matmul_weights(self) -> int:
        """Weights of a model of its own that multiply each token's activations (distributed/throughput.py)."""
        return 0

    def rollout_values(self, gen: Generation, temperature: float, batch_size: int) -> torch.Tensor | None:
        """(B, T) V(s_t) of the rollout before the update, or None."""
        return None

    def update_values(self, policy_out: Forward, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_len: int, temperature: float) -> torch.Tensor | None:
        """(b, T') values of a micro-batch with gradients, given the policy's forward over the same rows."""
        return None

    def step(self, active: bool) -> None:
        """Optimizer step (when `active`: not skipped by a guardrail), scheduler step, gradients cleared."""
        if self.optimizer is None:
            return
        if active:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def tensors(self, processes: Processes) -> dict[str, dict[str, torch.Tensor]]:
        """Checkpoint tensor groups (name -> whole tensors; gathering shards is a collective)."""
        if self.head is None:
            return {}
        return {"value_head": processes.full_state(self.head)}

    def load_tensors(self, tensors: dict[str, dict[str, torch.Tensor]], processes: Processes) -> None:
        if self.head is not None:
            processes.load_full_state(self.head, tensors["value_head"])

    def optimizer_state(self, processes: Processes) -> dict:
        """Checkpoint state of the optimizer and scheduler (None where there is none)."""
        return {"critic_opt": processes.optimizer_state(self.optimizer) if self.optimizer else None,
                "critic_sched": self.scheduler.state_dict() if self.scheduler else None}

    def load_optimizer_state(self, state: dict, processes: Processes) -> None:
        if self.optimizer is not None:
            processes.load_optimizer_state(self.optimizer, state["critic_opt"])
            self.scheduler.load_state_dict(state["critic_sched"])


class SharedHeadCritic(Critic):
    """A value head on the policy trunk: values come out of the policy's own forwards (sampling included),
    and the value loss, weighted by `ppo.vf_coef`, also trains the trunk. The head has its own optimizer, so
    critic warm-up can step it while the policy stands still."""

    def __init__(self, head: ValueHead, vf_coef: float):
        self.head = self.policy_head = head
        self.loss_coef = vf_coef

    def rollout_values(self, gen, temperature, batch_size):
        return gen.values  # read by the head during sampling

    def update_values(self, policy_out, input_ids, attention_mask, response_len, temperature):
        return policy_out.values


class SeparateCritic(Critic):
    """A value model of its own (a copy of the policy's base, or a reward model's trunk) with a value head.
    Its loss has weight 1: no parameter is shared, so `ppo.vf_coef` would only rescale its learning rate."""

    def __init__(self, model: nn.Module, head: ValueHead):
        self.model, self.head = model, head
        lm_head = model.get_output_embeddings()
        if lm_head is not None and lm_head.weight is not model.get_input_embeddings().weight:
            lm_head.requires_grad_(False)  # values come from hidden states: an untied LM head is never used
        self.forward = ResponseForward(model, head)  # what the update calls (wrapped for several processes)
        self.loss_coef = 1.0

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + super().parameters()

    def wrap(self, processes):
        self.forward = processes.wrap(self.forward, *ResponseForward.example(processes.device))

    def modules(self):
        return [self.forward]

    def matmul_weights(self):
        return matmul_weights(self.model, lm_head=False)

    def rollout_values(self, gen, temperature, batch_size):
        return forward_answers(gen, self.model, temperature, batch_size, self.head, with_logits=False).values

    def update_values(self, policy_out, input_ids, attention_mask, response_len, temperature):
        return self.forward(input_ids, attention_mask, response_len, temperature, with_logits=False)[2]

    def tensors(self, processes):
        return {**super().tensors(processes), "critic": processes.full_state(self.model, trainable_only=True)}

    def load_tensors(self, tensors, processes):
        super().load_tensors(tensors, processes)
        processes.load_full_state(self.model, tensors["critic"])


def critic_from_reward_model(rm_dir: str, head: ValueHead, hidden_size: int, device: torch.device) -> nn.Module:
    """The critic as the reward model: its trunk, and its normalised head copied into `head`, so V(s_t)
    starts as the RM's score of the text up to t (an implementation detail of OpenRLHF and the N+
    details); the values then learn the KL-shaped return from there."""
    from rlhflab.rewards.reward_model import load_reward_model

    rm = load_reward_model(rm_dir, device=str(device))
    trunk = rm.model.backbone
    if not hasattr(trunk, "get_decoder") or trunk.config.hidden_size != hidden_size:
        raise UserError(f"model.critic_init={rm_dir}: the reward model must be a causal-LM reward model with "
                        f"hidden size {hidden_size} (the policy's); train it with "
                        "`rlhflab rm train --base` set to the policy's model")
    with torch.no_grad():
        head.net[0].weight.copy_(rm.model.head.linear.weight)
        head.net[0].bias.copy_(rm.model.head.linear.bias)
    return trunk.train().requires_grad_(True)
