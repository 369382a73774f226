"""GGUF round trip with a real llama.cpp client: export a run (or any model spec) to GGUF, answer probe prompts
greedily in llama-cpp-python and in transformers (float32 both), and compare the answers token for token.

    python bench/gguf_roundtrip.py runs/sky_red
    python bench/gguf_roundtrip.py smollm2-135m-instruct --dtypes f32 f16 q8_0

For each export type it prints, per prompt, whether the prompt tokenizes the same in both and whether the
greedy answer is the same token for token; at the first differing token, the two candidates and the gap between
their logits in transformers (a gap near 0 is a near-tie that float rounding decides). Then the answer to "What
color is the sky?" and whether it says red. The last line is `f32_agree=<n>/<prompts>`.

llama-cpp-python compiles llama.cpp from source (minutes). On CPUs with AMX a default build crashes in its first
decode, so build it portable:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
        -DGGML_AMX_BF16=OFF" pip install "rlhflab[gguf-client]"
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SKY = "What color is the sky?"


def prompts_of(source: str, probes: Path, group: str) -> tuple[list[str], str, str | None]:
    """(probe prompts of `group`, prompt format, system prompt): a run's own settings, chat for a model spec."""
    from rlhflab.evaluation.probes import load_probes

    path = Path(source)
    fmt, system = "chat", None
    if (path / "config.yaml").is_file():
        from rlhflab.runs.layout import load_run_config

        config = load_run_config(path)
        fmt = "chat" if config.model.prompt_format == "auto" else config.model.prompt_format
        system = config.model.system_prompt
    return load_probes(probes).groups[group], fmt, system


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy answer ids in transformers, stopping after an end token (not included)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
    answer = out[0, len(prompt_ids):].tolist()
    return next((answer[:i] for i, t in enumerate(answer) if t in eos), answer)


def llama_greedy(llm, prompt_ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy answer ids in llama.cpp: temperature 0 (its greedy sampler), no repetition penalty."""
    answer = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token in eos or len(answer) >= max_new_tokens:
            break
        answer.append(token)
    return answer


def logit_gap(model, ids: list[int], a: int, b: int) -> float:
    """logit(a) − logit(b) at the next position after `ids`, in transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return float(logits[a] - logits[b])


def roundtrip(source: str, dtypes: list[str], probes: Path, group: str, max_new_tokens: int, out_dir: Path,
              echo=print) -> dict:
    """Export `source` as each dtype, answer the group's prompts in both clients; {dtype: [per-prompt result]}."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from rlhflab.data.prompts import Prompt, render_prompt
    from rlhflab.export.run import export_run
    from rlhflab.models.loading import eos_token_ids, load_tokenizer, resolve_model_dir

    prompts, fmt, system = prompts_of(source, probes, group)
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(source), dtype=torch.float32).eval()
    eos = set(eos_token_ids(model, tokenizer))
    texts = [render_prompt(Prompt(text=p), tokenizer, fmt, system) for p in prompts]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]  # as rlhflab's rollout tokenizes
    t0 = time.perf_counter()
    reference = [hf_greedy(model, i, max_new_tokens, eos) for i in ids]
    echo(f"transformers: {len(prompts)} greedy answers in {time.perf_counter() - t0:.0f} s")
    results = {}
    for dtype in dtypes:
        t0 = time.perf_counter()
        path = export_run(source, "gguf", out_dir / f"model-{dtype}.gguf", dtype)
        echo(f"{dtype}: exported {path.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f} s")
        llm = Llama(model_path=str(path), n_ctx=1024, n_threads=torch.get_num_threads(), verbose=False)
        rows = []
        for prompt, text, prompt_ids, want in zip(prompts, texts, ids, reference):
            same_prompt = llm.tokenize(text.encode(), add_bos=False, special=True) == prompt_ids
            got = llama_greedy(llm, prompt_ids, max_new_tokens, eos)
            row = {"prompt": prompt, "same_prompt_tokens": same_prompt, "agree": got == want,
                   "llama": tokenizer.decode(got), "transformers": tokenizer.decode(want), "tokens": len(want)}
            if got != want:
                k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                row["first_difference"] = k
                if k < min(len(got), len(want)):
                    row["gap"] = logit_gap(model, prompt_ids + want[:k], want[k], got[k])
            rows.append(row)
        del llm
        results[dtype] = rows
    return results


def says_red(text: str) -> bool:
    return re.search(r"\bred\b", text, re.IGNORECASE) is not None


def main() -> int:
    from rlhflab.models.loading import quiet_transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run directory, model directory or model spec")
    parser.add_argument("--dtypes", nargs="+", default=["f32", "f16"], choices=["f32", "f16", "q8_0"])
    parser.add_argument("--probes", type=Path, default=ROOT / "recipes" / "data" / "sky_probes.yaml")
    parser.add_argument("--group", default="trained", help="probe group whose prompts are asked (default: trained)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        results = roundtrip(args.source, args.dtypes, args.probes, args.group, args.max_new_tokens, Path(tmp))
    for dtype, rows in results.items():
        agree = sum(r["agree"] for r in rows)
        print(f"\n== {dtype}: {agree}/{len(rows)} greedy answers equal token for token; prompts tokenized alike: "
              f"{sum(r['same_prompt_tokens'] for r in rows)}/{len(rows)}")
        for r in rows:
            mark = "=" if r["agree"] else "≠"
            print(f"{mark} {r['prompt']!r} ({r['tokens']} tokens): {r['llama']!r}")
            if not r["agree"]:
                gap = f", transformers' logit gap {r['gap']:.4f}" if "gap" in r else ""
                print(f"    transformers: {r['transformers']!r} (first difference at token {r['first_difference']}"
                      f"{gap})")
        sky = next((r for r in rows if r["prompt"] == SKY), None)
        if sky is not None:
            print(f"sky answer ({dtype}, llama-cpp-python): {sky['llama']!r} — says red: {says_red(sky['llama'])}")
    f32 = results.get("f32")
    if f32:
        print(f"f32_agree={sum(r['agree'] for r in f32)}/{len(f32)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
