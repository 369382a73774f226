"""Rollout sampling from the LoRA policy itself against its bf16 sampling copy (models/sampling_copy.py), on the
embedded model under this CPU's bf16 autocast — the measurement behind `rollout.sampling_copy`.

    python bench/sampling_copy.py --repeats 3

Samples the main job's rollout (48 answers, 24 new tokens, temperature 1) from a LoRA policy whose adapters were
moved off zero. Each timing is the minimum over --repeats runs (the run other processes disturbed least). Prints
the CPU, the threads, one line per way of sampling, the copy's refresh time, then `sampling_copy_speedup=<x>`.
"""

from __future__ import annotations

import argparse

import torch
from precision_probe import best  # bench/ is on sys.path when a script here runs
from sky_red_speed import cpu_info

from rlhflab.data.prompts import Prompt, render_prompt
from rlhflab.models.loading import add_lora, load_causal_lm, load_tokenizer, pick_device
from rlhflab.models.precision import resolve_precision
from rlhflab.models.sampling_copy import SamplingCopy
from rlhflab.ppo.rollout import generate

MODEL = "smollm2-135m-instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--answers", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    device = pick_device("auto")
    precision = resolve_precision("auto", device)
    name, flags = cpu_info()
    print(f"cpu={name!r} bf16_flags={sorted(flags)} threads={torch.get_num_threads()} {precision.log_line}")
    tokenizer = load_tokenizer(MODEL)
    policy = add_lora(load_causal_lm(MODEL, device, precision.param_dtype), 16, 32, "all-linear")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)  # a trained adapter: B is no longer zero
    texts = [render_prompt(Prompt(text="What color is the sky on a clear day?"), tokenizer, "chat")] * args.answers

    def sample(model):
        with precision.autocast():
            generate(model, tokenizer, texts, args.new_tokens, 1.0)

    copy = SamplingCopy(policy)
    seconds = {"lora_policy": best(lambda: sample(policy), args.repeats),
               "sampling_copy": best(lambda: sample(copy.refresh()), args.repeats)}
    for name, s in seconds.items():
        print(f"{name}: {s:.2f} s for {args.answers} answers x {args.new_tokens} tokens")
    print(f"refresh: {best(copy.refresh, args.repeats) * 1000:.0f} ms")
    print(f"sampling_copy_speedup={seconds['lora_policy'] / seconds['sampling_copy']:.2f}")


if __name__ == "__main__":
    main()
