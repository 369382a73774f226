"""fp32 against bf16 autocast on this CPU: matmul TFLOP/s at SmolLM2-sized linear layers, and one forward +
backward of the embedded model — the measurement behind `model.dtype: auto` (docs/ppo.md, speed notes).

    python bench/precision_probe.py --repeats 5

Each timing is the minimum over --repeats runs (other processes share the cores; the minimum is the run
they disturbed least). Prints the CPU's bf16 flags, one line per shape, then `bf16_speedup_fwd_bwd=<x>`.
"""

from __future__ import annotations

import argparse
import time

import torch

from rlhflab.models.precision import cpu_bf16_flags

TOKENS = 16 * 96  # 16 answers × 96 tokens: a training forward
DECODE = 16  # one decode step of 16 answers
# (in, out) of SmolLM2-135M's linear layers: attention q/o, MLP up and down, the LM head
SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 49152)]


def best(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_seconds(m: int, k: int, n: int, bf16: bool, repeats: int) -> float:
    # a parameter (requires grad), so autocast casts it to bf16 once per region, as for a model's weights
    x, w = torch.randn(m, k), torch.randn(n, k, requires_grad=True)

    @torch.no_grad()
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for _ in range(5):
                torch.nn.functional.linear(x, w)

    return best(run, repeats) / 5


def fwd_bwd_seconds(bf16: bool, repeats: int) -> float:
    from rlhflab.models.loading import EMBEDDED, load_causal_lm

    model = load_causal_lm(EMBEDDED, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (16, 96))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)

    return best(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-model", action="store_true", help="matmuls only")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, bf16 flags {sorted(cpu_bf16_flags()) or 'none'}")
    for m, (k, n) in [(m, s) for m in (TOKENS, DECODE) for s in SHAPES]:
        flops = 2 * m * k * n
        f32, b16 = (matmul_seconds(m, k, n, bf16, args.repeats) for bf16 in (False, True))
        print(f"linear {m}x{k} @ {k}x{n}: fp32 {flops / f32 / 1e12:.3f} TFLOP/s, "
              f"bf16 autocast {flops / b16 / 1e12:.3f} TFLOP/s ({f32 / b16:.2f}x)")
    if not args.skip_model:
        f32, b16 = (fwd_bwd_seconds(bf16, args.repeats) for bf16 in (False, True))
        print(f"smollm2-135m forward+backward 16x96: fp32 {f32:.3f} s, bf16 autocast {b16:.3f} s")
        print(f"bf16_speedup_fwd_bwd={f32 / b16:.2f}")


if __name__ == "__main__":
    main()
