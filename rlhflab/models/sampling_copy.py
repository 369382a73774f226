"""A bf16 copy of the policy that only samples, LoRA merged into its weights, refreshed once per iteration.

Why: token-by-token generation is bound by per-step overhead, not FLOPs. Under bf16 autocast every step casts
each fp32 weight to bf16 again (autocast caches casts only of weights that require grad), and peft's LoRA
wrappers add two small matmuls and Python dispatch to each of the ~200 linear layers. Sampling 48 answers of
24 tokens from the embedded model on a 2-core Xeon (AMX) took 4.83 s through the peft model and 2.17 s from this
copy (bench/sampling_copy.py). vLLM-based trainers (OpenRLHF, veRL) do the same: merged weights, synced to
the sampler each iteration.

Only where forward passes compute in bf16 anyway and old log-probs, values and the reference's log-probs come
from training-style forwards (`Trainer.recomputes_old_logprobs`): the copy decides which tokens are drawn, the
training numbers never come from it. Memory: half the policy's size. Not under FSDP2, whose point is that no
process holds a whole model.
"""

from __future__ import annotations

import copy

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn


class SamplingCopy:
    """`model`: a plain transformers model in bf16 whose weights are the policy's (`refresh()`) or, for LoRA, the
    base's (`refresh(merged=False)`: the reference, for the probe evaluation's reference side)."""

    def __init__(self, policy: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.lora = isinstance(policy, PeftModel)
        source = policy.get_base_model() if self.lora else policy
        plain = copy.deepcopy(policy).merge_and_unload() if self.lora else copy.deepcopy(policy)
        self.model = plain.to(dtype).eval().requires_grad_(False)
        modules = dict(source.named_modules())
        params = dict(source.named_parameters())
        # (copy's weight, the LoRA layer it is merged from) and (copy's weight, trained policy weight)
        self.merged: list[tuple[torch.Tensor, LoraLayer]] = []
        self.copied: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, weight in self.model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            layer = modules.get(module_name)
            if isinstance(layer, LoraLayer) and leaf == "weight":
                self.merged.append((weight, layer))
            elif name in params and params[name].requires_grad:  # frozen weights never change
                self.copied.append((weight, params[name]))

    @torch.no_grad()
    def refresh(self, merged: bool = True) -> nn.Module:
        """Copy the policy's current weights in (LoRA merged), or with `merged=False` the LoRA base's; return
        the model."""
        if not merged and not self.lora:
            raise ValueError("a full fine-tune's copy holds the policy only: its reference is a model of its own")
        for weight, layer in self.merged:
            adapter = layer.active_adapters[0]
            base = layer.get_base_layer().weight
            weight.copy_(base + layer.get_delta_weight(adapter) if merged else base)
        for weight, source in self.copied:
            weight.copy_(source)
        return self.model

    def samplers(self) -> dict:
        """What the probe evaluation samples each side from (`evaluation.probes.evaluate`'s `samplers`)."""
        if not self.lora:
            return {"policy": self.refresh}
        return {"policy": self.refresh, "reference": lambda: self.refresh(merged=False)}
