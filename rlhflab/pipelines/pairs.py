"""`prefs generate`: sample two answers per prompt from a model and store them as pending pairs.

The prompts are drawn in file order, cycling through the file, two samples each, until `pairs` new pairs
are stored. A draw whose two answers are the same text is skipped (comparing them teaches nothing), and a
pair the store already holds is not new. Answers are sampled with `rollout.generate`, the function PPO
samples with, from the prompt rendered the way training renders it (`prompt_format`, chat template or
plain), so the pairs come from the same distribution the policy is trained on. Each answer is stored with
the model spec and the sampling settings that produced it; each pair is committed when it is stored, so an
interrupted run keeps what it made.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rlhflab.errors import UserError
from rlhflab.preferences.store import PreferenceStore


@dataclass(frozen=True)
class GenerateCounts:
    """What `generate_pairs` did."""

    stored: int  # new pairs stored
    identical: int  # draws skipped because both answers were the same text
    existing: int  # draws whose pair the store already held
    draws: int  # prompts drawn (two samples each)


def generate_pairs(
    model: str,
    prompts_file: str | Path,
    db: str | Path | PreferenceStore,
    pairs: int,
    *,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    prompt_format: str = "auto",
    system_prompt: str | None = None,
    device: str = "auto",
    max_draws: int | None = None,
    on_progress=None,
) -> GenerateCounts:
    """Sample two answers per prompt from `model` (a model spec or a run directory) into the store at `db`.

    Stops once `pairs` new pairs are stored, or after `max_draws` prompt draws (default 10 × pairs), which
    only a model that keeps repeating itself reaches. `batch_size` answers (batch_size / 2 prompts) are
    sampled per `generate` call. `on_progress(stored)` is called after each batch.
    """
    from rlhflab.data.prompts import load_prompts, render_prompt
    from rlhflab.models.loading import load_for_sampling, pick_device
    from rlhflab.ppo.rollout import generate
    from rlhflab.runs.seeding import seeded

    if pairs < 1:
        raise UserError(f"--pairs must be ≥ 1, got {pairs}")
    if temperature <= 0:
        raise UserError(f"--temperature must be > 0 (two samples of a greedy answer are identical), got {temperature}")
    if batch_size < 2:
        raise UserError(f"--batch-size must be ≥ 2 (two answers per prompt), got {batch_size}")
    items = load_prompts(prompts_file)  # a bad prompt file fails before the model loads
    dev = pick_device(device)
    opened = nullcontext(db) if isinstance(db, PreferenceStore) else PreferenceStore(db)
    with opened as store, seeded(seed, dev):  # repeatable draws; the caller's RNG state is left as it was
        lm, tokenizer, _, fmt, precision = load_for_sampling(model, dev, prompt_format=prompt_format)
        rendered = [render_prompt(p, tokenizer, fmt, system_prompt) for p in items]
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "max_new_tokens": max_new_tokens,
                    "prompt_format": fmt}
        limit = max_draws if max_draws is not None else 10 * pairs
        stored = identical = existing = draws = 0
        cursor = 0
        while stored < pairs and draws < limit:
            k = min(batch_size // 2, pairs - stored, limit - draws)
            idx = [(cursor + j) % len(items) for j in range(k)]
            cursor += k
            draws += k
            texts = [rendered[i] for i in idx for _ in range(2)]
            with precision.autocast():
                gen = generate(lm, tokenizer, texts, max_new_tokens, temperature, top_k, top_p, do_sample=True,
                               with_logprobs=False)
            for j, i in enumerate(idx):
                a, b = gen.texts[2 * j], gen.texts[2 * j + 1]
                if a == b:
                    identical += 1
                    continue
                before = store.count_pairs()
                store.add_generated_pair(items[i].display, a, b, model=model, sampling=sampling,
                                         messages=items[i].messages)
                if store.count_pairs() > before:
                    stored += 1
                else:
                    existing += 1
            if on_progress is not None:
                on_progress(stored)
        return GenerateCounts(stored, identical, existing, draws)
