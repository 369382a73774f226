"""What a scale user watches: model FLOPs of an iteration, the device's peak, MFU, peak memory.

Model FLOPs count the matrix multiplications of the transformer's weights, 2 per weight per token for a forward
pass (Kaplan et al. 2020; PaLM's MFU): the LM head counts, the embedding lookup does not, attention scores are
left out (under 5 % of a layer's work below ~1k tokens for these shapes). A backward costs 2 more per weight
for the gradient of the activations, and 2 more for the weights' own gradients when the weights are trained
(full fine-tuning: 6 per weight per token in all; LoRA: 4 — the base's weights are frozen, the adapters' cost is
negligible).
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity), per GPU.
GPU_PEAK_BF16_TFLOPS = {  # matched in order against the device name: more specific names first
    "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0,
    "L40": 181.0, "L4": 121.0,
}


def matmul_weights(model: nn.Module, lm_head: bool = True) -> int:
    """Weights that multiply every token's activations: every parameter but the input embedding matrix (a lookup)
    — unless it is tied to the LM head, whose matmul it is — and, with `lm_head=False` (a critic reads hidden
    states only), but the LM head."""
    head = model.get_output_embeddings()  # None: a bare trunk (a critic started from a reward model)
    head = head.weight if head is not None else None
    skip = {id(model.get_input_embeddings().weight)} - ({id(head)} if lm_head else set())
    if not lm_head and head is not None:
        skip.add(id(head))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def iteration_flops(weights: int, sampled_tokens: int, forward_tokens: int, trained_tokens: int, lora: bool) -> float:
    """Model FLOPs of one iteration for a model of `weights` matmul weights: `sampled_tokens` through the
    sampler, `forward_tokens` through scoring forwards (reference, recomputed log-probs, a separate critic's
    values, each counted per model), `trained_tokens` through forward + backward (per epoch and model)."""
    backward = 2 if lora else 4
    return 2.0 * weights * (sampled_tokens + forward_tokens) + (2.0 + backward) * weights * trained_tokens


def gpu_peak_flops(device: torch.device) -> tuple[float, str] | None:
    """(peak FLOP/s, where it came from) of a CUDA device in bf16 from GPU_PEAK_BF16_TFLOPS, or None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16 (data sheet)"
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: tensors allocated on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


def throughput_metrics(weights: dict[str, int], tokens: int, local_tokens: int, answer_tokens: int,
                       forwards: int, epochs: int, lora: bool, seconds: float, processes,
                       peak: tuple[float, str] | None) -> dict[str, float]:
    """throughput/ and memory/ metrics of one iteration: `tokens` (prompt + answer, every process's) sampled, run
    through `forwards` scoring passes of the policy's size and `epochs` update passes, by a policy and a separate
    critic of `weights` {"policy", "critic"} matmul weights (0: none), in `seconds`. MFU when the peak is known."""
    flops = iteration_flops(weights["policy"], tokens, forwards * tokens, epochs * tokens, lora)
    if weights["critic"]:  # a separate critic: its rollout forward and its update
        flops += iteration_flops(weights["critic"], 0, tokens, epochs * tokens, lora)
    device = processes.device
    out = {"throughput/tokens_per_s": tokens / seconds,
           "throughput/tokens_per_s_per_process": local_tokens / seconds,  # process 0's (it logs)
           "throughput/answer_tokens_per_s": answer_tokens / seconds,
           "throughput/tflops": flops / seconds / 1e12,
           "memory/peak_gib": processes.max(torch.tensor(peak_memory_gib(device), device=device)).item()}
    if peak is not None:
        out["throughput/mfu"] = flops / seconds / (peak[0] * processes.world_size)
    return out
