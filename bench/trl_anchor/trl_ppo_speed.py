"""Seconds per PPO iteration of TRL 0.10.1's PPOTrainer on the sky-red task: the anchor of bench/sky_red_speed.py.

Runs in its own venv (bench/trl_anchor/setup.sh), fully offline, on the local model directory that rlhflab
converts (`rlhflab.models.resolve_model_dir('smollm2-135m-instruct')`):

    bench/trl_anchor/.venv/bin/python bench/trl_anchor/trl_ppo_speed.py --model-dir DIR --iterations 5

TRL's settings: 16 prompts × 1 sample per iteration (batch_size 16), 32 new tokens sampled with TRL's
generate kwargs (do_sample, top_k 0, top_p 1.0, min_length -1, temperature 1.0), full fine-tuning, the value
head on the policy trunk (AutoModelForCausalLMWithValueHead), a frozen copy of the policy as the reference,
init_kl_coef 0.05 with adap_kl_ctrl False, ppo_epochs 4, mini_batch_size 4, learning_rate 1.41e-5; every
other PPOConfig field at its default. Reward: 1.0 if the whole word "red" appears in the decoded answer
(case-insensitive), else 0.0. Prompts: recipes/data/sky_train.txt in seeded shuffled passes, rendered with
the tokenizer's chat template (add_generation_prompt=True), as rlhflab does.

The model directory is written by transformers 5, which transformers 4.46 reads wrongly or not at all in two
places; both are bridged here without touching TRL: config.json keeps rope_theta under `rope_parameters`
(4.46 would silently fall back to 10000 instead of 100000), and tokenizer_config.json names the
`TokenizersBackend` class (the fast tokenizer is built from tokenizer.json directly, the chat template read
from chat_template.jinja).

Prints one line per iteration (generation, reward, step seconds), then the medians, peak RSS, and last
`s_per_iteration=<median>`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "recipes" / "data" / "sky_train.txt"
RED = re.compile(r"(?<!\w)red(?!\w)", re.IGNORECASE)  # rlhflab's contains:red


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), **special)
    template = model_dir / "chat_template.jinja"
    tok.chat_template = template.read_text() if template.exists() else cfg.get("chat_template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_config(model_dir: Path):
    raw = json.loads((model_dir / "config.json").read_text())
    config = AutoConfig.from_pretrained(model_dir)
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" not in raw and "rope_theta" in rope:
        config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    return config


def peak_rss_gib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: when this script is launched by bench/sky_red_speed.py,
    Linux carries the parent's high-water mark over fork + exec into ru_maxrss (it read 4.09 GiB, the
    parent's figure, instead of TRL's own)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()

    tokenizer = load_tokenizer(args.model_dir)
    base = AutoModelForCausalLM.from_pretrained(args.model_dir, config=load_config(args.model_dir),
                                                torch_dtype=torch.float32)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base)
    config = PPOConfig(
        model_name=str(args.model_dir), learning_rate=1.41e-5, batch_size=16, mini_batch_size=4,
        ppo_epochs=4, init_kl_coef=0.05, adap_kl_ctrl=False, seed=args.seed, log_with=None,
    )
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)  # ref: a frozen copy of the policy
    gen_kwargs = {"min_length": -1, "top_k": 0, "top_p": 1.0, "temperature": 1.0, "do_sample": True,
                  "max_new_tokens": 32, "pad_token_id": tokenizer.pad_token_id}

    texts = [line.strip() for line in PROMPTS.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    queries_all = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                           add_generation_prompt=True),
                             return_tensors="pt").input_ids[0] for t in texts]
    order: list[int] = []
    generator = torch.Generator().manual_seed(args.seed)

    print(f"TRL {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {trainer.accelerator.device}, rope_theta "
          f"{base.config.rope_theta:g}", flush=True)
    rows = []
    for it in range(1, args.iterations + 1):
        batch = []
        while len(batch) < config.batch_size:
            if not order:
                order = torch.randperm(len(queries_all), generator=generator).tolist()
            batch.append(order.pop(0))
        queries = [queries_all[i] for i in batch]
        t0 = time.perf_counter()
        responses = trainer.generate(queries, return_prompt=False, **gen_kwargs)
        t1 = time.perf_counter()
        answers = tokenizer.batch_decode(responses, skip_special_tokens=True)
        scores = [torch.tensor(float(RED.search(a) is not None)) for a in answers]
        t2 = time.perf_counter()
        stats = trainer.step(queries, responses, scores)
        t3 = time.perf_counter()
        row = {"generate": t1 - t0, "reward": t2 - t1, "step": t3 - t2, "total": t3 - t0}
        rows.append(row)
        length = statistics.mean(len(r) for r in responses)
        print(f"iter {it}: generate {row['generate']:.2f} s  reward {row['reward']:.3f} s  "
              f"step (forwards + update) {row['step']:.2f} s  total {row['total']:.2f} s  "
              f"answer length {length:.1f}  reward mean {statistics.mean(float(s) for s in scores):.2f}  "
              f"kl {float(stats['objective/kl']):.3f}", flush=True)
    peak_gib = peak_rss_gib()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"median: generate {med['generate']:.2f} s, reward {med['reward']:.3f} s, step {med['step']:.2f} s, "
          f"peak RSS {peak_gib:.2f} GiB")
    print(f"peak_rss_gib={peak_gib:.2f}")
    print(f"s_per_iteration={med['total']:.2f}")


if __name__ == "__main__":
    main()
