"""Peak memory of a rollout at a large vocabulary: log-probs recorded per step vs from stored logits.

The rollout used to ask `generate` for every step's full-vocabulary logits (`output_logits`) and turn them
into log-probs and entropy afterwards: T tensors of (B, V) floats, stacked into one (B, T, V), soft-maxed
twice — ≈ 4·B·T·V floats at the peak. `rollout.StepSampler` now records each step's log-prob and entropy
as it samples, so the rollout keeps O(B·T) numbers. This bench builds a random 2-layer Llama with a 150k
vocabulary (Qwen-sized; hidden size 64, so the weights are small) in a temp dir and samples B answers of
T new tokens both ways, each in a fresh process, reporting the peak RSS (ru_maxrss) of each and of a process
that only loads the model. A random model almost never draws EOS (p ≈ 1/V a step), so answers run to T.

    python bench/rollout_memory.py                # B = 8, T = 256, V = 150000
    python bench/rollout_memory.py --batch 16

The last line is `peak_rss_mib_old=<MiB> peak_rss_mib_new=<MiB>`.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("load", "old", "new")


def build_model(out: Path, vocab: int) -> None:
    """A random 2-layer Llama over `vocab` word tokens w0 … w{V-1}, with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlhflab.models.loading import quiet_transformers

    quiet_transformers()
    words = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab)}
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def old_rollout(model, tokenizer, texts: list[str], max_new_tokens: int):
    """The rollout as it was: sample with the same sampler, keep `output_logits`, derive log-probs after."""
    from transformers import LogitsProcessorList

    from rlhflab.models.forward import entropy_from_logits, logprobs_from_logits
    from rlhflab.ppo.rollout import NEUTRAL_DECODING, StepSampler

    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, logits_processor=LogitsProcessorList([StepSampler(1.0)]), **NEUTRAL_DECODING,
                         max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_k=None, top_p=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         return_dict_in_generate=True, output_logits=True)
    response_ids = out.sequences[:, enc["input_ids"].shape[1]:]  # (B, T)
    logits = torch.stack(out.logits, 1)  # (B, T, V)
    return response_ids, logprobs_from_logits(logits, response_ids), entropy_from_logits(logits)


def run_variant(variant: str, model_dir: str, batch: int, max_new_tokens: int) -> None:
    from rlhflab.models.loading import load_causal_lm, load_tokenizer
    from rlhflab.ppo.rollout import generate

    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, torch.device("cpu"), torch.float32).eval()
    texts = [f"w{10 + 3 * i} w{11 + 3 * i} w{12 + 3 * i}" for i in range(batch)]  # distinct prompts: no prefill
    torch.manual_seed(0)
    t0 = time.perf_counter()
    answer_tokens = 0
    if variant == "old":
        with torch.no_grad():
            response_ids, _, _ = old_rollout(model, tokenizer, texts, max_new_tokens)
        answer_tokens = response_ids.shape[1]
    elif variant == "new":
        gen = generate(model, tokenizer, texts, max_new_tokens)
        answer_tokens = gen.response_ids.shape[1]
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"variant={variant} answer_tokens={answer_tokens} seconds={seconds:.1f} peak_rss_mib={peak:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (internal)")
    parser.add_argument("--model-dir", help="the model built by a parent run (internal)")
    args = parser.parse_args()
    if args.variant:
        run_variant(args.variant, args.model_dir, args.batch, args.new_tokens)
        return
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        build_model(Path(tmp), args.vocab)
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--variant", variant, "--model-dir", tmp, "--batch", str(args.batch),
                   "--new-tokens", str(args.new_tokens)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            print(line, flush=True)
            peaks[variant] = float(line.rsplit("peak_rss_mib=", 1)[1])
    cells = args.batch * args.new_tokens * args.vocab
    print(f"B={args.batch} T={args.new_tokens} V={args.vocab}: one (B, T, V) float32 tensor is "
          f"{cells * 4 / 2**20:.0f} MiB; above loading: old {peaks['old'] - peaks['load']:.0f} MiB, "
          f"new {peaks['new'] - peaks['load']:.0f} MiB")
    print(f"peak_rss_mib_old={peaks['old']:.0f} peak_rss_mib_new={peaks['new']:.0f}")


if __name__ == "__main__":
    main()
