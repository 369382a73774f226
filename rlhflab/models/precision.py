"""Numeric precision of a run: the dtype parameters (and so AdamW's state) are stored in, and whether the
forward passes compute in bf16 under autocast.

`model.dtype` choices:
  float32        fp32 parameters and compute
  bfloat16       pure bf16 parameters: AdamW steps them directly, and an update below bf16's resolution
                 (2^-8 relative: 1e-5 on a weight of 0.01) rounds back to the old value — full fine-tuning
                 at small learning rates barely learns (tests/test_precision.py)
  bf16-autocast  fp32 master weights and optimizer state, matmuls in bf16 (torch.autocast)
  auto           bf16-autocast where bf16 matmuls are fast: CUDA with bf16 support, CPUs with AMX-BF16 or
                 AVX512-BF16 (bench/precision_probe.py; docs/ppo.md, speed notes); fp32 elsewhere
Log-probs, entropy, values and losses are computed in fp32 in every mode (`models.forward`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhflab.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "bf16-autocast")
# /proc/cpuinfo flags of native bf16 matmul instructions, best first, with the name the log line uses
CPU_BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The native bf16 instruction flags (CPU_BF16_FLAGS) this CPU reports; empty where /proc/cpuinfo is absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return set(flags) & set(CPU_BF16_FLAGS)


@dataclass(frozen=True)
class Precision:
    """How a run stores and computes: `param_dtype` for loading models, `autocast()` around forward passes."""

    name: str  # for the log line: "fp32", "bf16 weights", "bf16 autocast (AMX)", ...
    param_dtype: torch.dtype  # parameters and optimizer state
    device_type: str  # "cpu", "cuda", "mps"
    bf16_autocast: bool  # matmuls in bf16 under torch.autocast; parameters stay in param_dtype

    @property
    def log_line(self) -> str:
        return f"precision: {self.name}"

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16_autocast else self.param_dtype

    @property
    def bf16_compute(self) -> bool:
        """Forward passes round in bf16, so a sampling pass and a training forward give different log-probs."""
        return self.compute_dtype == torch.bfloat16

    def autocast(self):
        """Context for forward passes (sampling, reference, critic, training): bf16 matmuls, or nothing."""
        if not self.bf16_autocast:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)


def _fast_bf16(device: torch.device, flags: set[str]) -> str | None:
    """Where bf16 matmuls are native, the name of the hardware path; None where they are emulated."""
    if device.type == "cuda":
        return "CUDA" if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        # measured on Zen 4 (avx512_bf16): bf16 autocast 1.45x faster forward+backward; on AVX2-only CPUs
        # bf16 matmuls are emulated and hundreds of times slower (bench/precision_probe.py, docs/ppo.md)
        return next((label for flag, label in CPU_BF16_FLAGS.items() if flag in flags), None)
    return None  # mps and others: no measurement, so fp32


def resolve_precision(spec: str, device: torch.device, cpu_flags: set[str] | None = None) -> Precision:
    """`model.dtype` (see DTYPES) on a device → Precision. `cpu_flags` defaults to this CPU's (cpu_bf16_flags)."""
    if spec not in DTYPES:
        raise UserError(f"model.dtype: unknown '{spec}'; choose one of {', '.join(DTYPES)}")
    flags = cpu_bf16_flags() if cpu_flags is None else cpu_flags
    fast = _fast_bf16(device, flags)
    if spec == "float32" or (spec == "auto" and fast is None):
        return Precision("fp32", torch.float32, device.type, bf16_autocast=False)
    if spec == "bfloat16":
        return Precision("bf16 weights (no fp32 master copy)", torch.bfloat16, device.type, bf16_autocast=False)
    # say so when an explicit bf16-autocast runs where bf16 is emulated: it works, slowly
    return Precision(f"bf16 autocast ({fast or 'emulated: slow'})", torch.float32, device.type, bf16_autocast=True)
