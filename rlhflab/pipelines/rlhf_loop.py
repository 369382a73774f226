"""The iterative RLHF loop: sample pairs from the current policy → label → train a reward model → PPO → repeat.

    rlhflab rlhf recipes/rlhf_loop.yaml --out RUN

Round r (policy π_r: the recipe's model for r = 1, else RUN/round_{r-1}/ppo/final):
  1. generate  `pairs_per_round` pairs sampled from π_r (two answers per prompt) → RUN/prefs.db
  2. label     the `judge` reward spec labels every pending pair (labeler "judge:SPEC"); with no judge the
               loop stops and asks for `rlhflab prefs label`, and a re-run continues once every pair has a label
  3. RM        a reward model trained from the base on every decided pair so far → RUN/round_r/rm, normalised so
               π_r's answers of this round (up to rm.calibration_samples of them) score mean 0, std 1 (π_r is
               PPO's reference in step 4)
  4. PPO       the PPO recipe with `reward.spec = model:RUN/round_r/rm`, `model.name = π_r` → RUN/round_r/ppo
               (its own metrics, checkpoints, report and final/)
  5. measure   the judge's mean score on `heldout_prompts` before (π_r) and after (π_{r+1}): answers sampled
               at the recipe's temperature with a fixed seed, `eval_samples_per_prompt` per prompt, so the
               two numbers differ only by the weights; KL = `objective/kl` of the PPO run's last iteration
               (nats per answer, to π_r, not to the original base).

RUN/summary.json is rewritten after every round: {"rounds": [{"pairs", "rm_accuracy", "judge_score_before",
"judge_score_after", "kl", ...}, ...]}. A re-run with the same --out skips finished rounds and, inside an
unfinished one, every finished step (stored pairs are counted, labels are idempotent, a finished RM_DIR is
kept, PPO resumes from its last checkpoint).
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from rlhflab.config import (
    Config,
    RewardModelConfig,
    Section,
    apply_overrides,
    config_from_dict,
    read_recipe,
    resolve_paths,
    validated,
)
from rlhflab.errors import Stopped
from rlhflab.files import make_dir, read_yaml, write_json_atomic
from rlhflab.runs.stopping import StopRequests


class LoopConfig(Section):
    """An RLHF loop. Paths are relative to the loop file's folder."""

    recipe: str
    """PPO recipe (YAML) run each round; the loop sets its model.name and reward.spec."""
    prompts: str | None = None
    """Prompt file the preference pairs are sampled on (None: the recipe's data.prompts)."""
    heldout_prompts: str | None = None
    """Prompt file for judge_score_before/after (None: `prompts`, which PPO trains on, so not held out)."""
    rounds: int = Field(2, ge=1)
    """Rounds K of generate → label → RM → PPO."""
    pairs_per_round: int = Field(200, ge=1)
    """New pairs sampled from the current policy each round."""
    judge: str | None = None
    """Reward spec that labels the pairs (AI feedback, e.g. `vader`); None: humans label with `prefs label`."""
    judge_margin: float = Field(0.0, ge=0)
    """Judge scores this close or closer are a tie (ties do not train the RM)."""
    score_with: str | None = None
    """Reward spec for judge_score_before/after (None: the judge; with human labels and none given, null)."""
    eval_samples_per_prompt: int = Field(2, ge=1)
    """Sampled answers per held-out prompt for judge_score_before/after."""
    seed: int = 0
    """Seed of pair sampling, RM training and the judge-score samples."""
    rm: RewardModelConfig = RewardModelConfig()
    """Reward-model training, the keys of `rlhflab rm train` (base None: the recipe's model.name)."""
    set: list[str] = []
    """`dotted.key=value` overrides applied to the PPO recipe, like `rlhflab train --set`."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for pair sampling, the RM and the judge-score samples (PPO uses the recipe's model.device)."""


def load_loop_config(path: str | Path) -> tuple[LoopConfig, Path]:
    """The loop file, validated, with its paths resolved against its folder; and that folder."""
    path = Path(path)
    raw = read_yaml(path, "loop file", "pass a loop file like recipes/rlhf_loop.yaml",
                    "loop keys (recipe:, rounds:, judge:, ...)")
    config = validated(LoopConfig, raw, str(path))
    base = path.parent.resolve()

    def fix(p: str | None) -> str | None:
        if p is None or Path(p).is_absolute():
            return p
        return str((base / p).resolve())

    config.recipe = fix(config.recipe)
    config.prompts = fix(config.prompts)
    config.heldout_prompts = fix(config.heldout_prompts)
    if config.rm.base is not None and (base / config.rm.base).exists():
        config.rm.base = str((base / config.rm.base).resolve())
    return config, base


def ppo_config(loop: LoopConfig, policy: str | None = None, rm_dir: Path | None = None) -> Config:
    """The recipe with the loop's --set overrides, the current policy and the round's reward model
    (None: the recipe's own model.name / reward.spec)."""
    recipe = Path(loop.recipe)
    raw = apply_overrides(read_recipe(recipe), list(loop.set))
    if policy is not None:
        raw.setdefault("model", {})["name"] = policy
    if rm_dir is not None:
        raw.setdefault("reward", {})["spec"] = f"model:{rm_dir.resolve()}"
    raw.setdefault("train", {})["save_final"] = True  # the next round samples from RUN/round_r/ppo/final
    return resolve_paths(config_from_dict(raw, str(recipe)), recipe.parent)


def run_loop(loop_yaml: str | Path, out_dir: str | Path, *, quiet: bool = False) -> dict:
    """Run (or continue) the loop in `out_dir`; returns the summary.

    Tunes the process's malloc for training (`keep_freed_memory`). When no judge is set and pairs wait for a
    human label, prints how to label them and returns early with
    `summary["waiting_for_labels"]` = the number of unlabeled pairs (not written to summary.json).
    """
    from rich.console import Console

    from rlhflab.models.loading import keep_freed_memory
    from rlhflab.preferences.store import PreferenceStore
    from rlhflab.rewards.specs import build_reward

    console = Console(stderr=True, quiet=quiet)
    loop, base_dir = load_loop_config(loop_yaml)
    out = Path(out_dir).resolve()
    base_config = ppo_config(loop)  # a broken recipe fails before any work
    prompts = loop.prompts or base_config.data.prompts
    heldout = loop.heldout_prompts or prompts
    judge = build_reward(loop.judge, base_dir=base_dir) if loop.judge else None
    score_spec = loop.score_with or loop.judge
    scorer = build_reward(score_spec, base_dir=base_dir) if score_spec else None
    keep_freed_memory()  # a training job (RM, PPO): large gradient buffers stay in the heap between steps
    make_dir(out)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"rounds": []}
    db = out / "prefs.db"
    r0 = base_config.rollout

    def measure(model: str) -> float | None:
        if scorer is None:
            return None
        return judge_score(model, heldout, scorer, samples_per_prompt=loop.eval_samples_per_prompt,
                           max_new_tokens=r0.max_new_tokens, temperature=r0.temperature, top_k=r0.top_k,
                           top_p=r0.top_p, seed=loop.seed, prompt_format=base_config.model.prompt_format,
                           system_prompt=base_config.model.system_prompt, device=loop.device)

    rerun = f"re-run `rlhflab rlhf {loop_yaml} --out {out_dir}` to continue (finished steps are kept)"

    def stop_if_asked(r: int, done: str) -> None:
        if stop.requested:
            raise Stopped(f"stopped by {stop.signal.name} in round {r} after {done}", stop.exit_code, rerun)

    with StopRequests("the current step of the loop", "stopping") as stop:
        for r in range(len(summary["rounds"]) + 1, loop.rounds + 1):
            round_dir = out / f"round_{r}"
            policy = base_config.model.name if r == 1 else str(out / f"round_{r - 1}" / "ppo" / "final")
            console.print(f"[bold]round {r}/{loop.rounds}[/]: policy {policy}")

            # 1. generate pairs from the current policy
            with PreferenceStore(db) as store:
                have = _pairs_from(store, policy)
            if have < loop.pairs_per_round:
                from rlhflab.pipelines.pairs import generate_pairs

                console.print(f"  sampling {loop.pairs_per_round - have} pairs on {prompts} → {db}")
                counts = generate_pairs(policy, prompts, db, loop.pairs_per_round - have,
                                        max_new_tokens=r0.max_new_tokens, temperature=r0.temperature, top_k=r0.top_k,
                                        top_p=r0.top_p, seed=loop.seed + 1000 * r + have,
                                        batch_size=r0.generation_batch_size or 16,
                                        prompt_format=base_config.model.prompt_format,
                                        system_prompt=base_config.model.system_prompt, device=loop.device)
                if counts.stored < loop.pairs_per_round - have:
                    console.print(f"  [yellow]warning[/]: only {counts.stored} new pairs; the policy repeats itself")
                stop_if_asked(r, "sampling pairs")

            # 2. label
            with PreferenceStore(db) as store:
                if judge is not None:
                    from rlhflab.preferences.judge import judge_pending

                    labels = judge_pending(store, judge, f"judge:{loop.judge}", loop.judge_margin)
                    console.print(f"  judge {loop.judge}: {labels['a']} a, {labels['b']} b, {labels['tie']} tie")
                else:
                    pending = sum(v.choice == "pending" for v in store.verdicts())
                    if pending:
                        Console(stderr=True).print(  # shown even when quiet: it is what to do next
                            f"{pending} pairs wait for a label: label with `rlhflab prefs label --db {db}`, "
                            f"then re-run `rlhflab rlhf {loop_yaml} --out {out_dir}`", markup=False, soft_wrap=True)
                        return {**summary, "waiting_for_labels": pending}
                reference_answers = [(pair.prompt.text, text) for pair in _generated_by(store, policy)
                                     for text in (pair.a.text, pair.b.text)]
            stop_if_asked(r, "labeling")

            # 3. reward model on every label so far
            rm_dir = round_dir / "rm"
            if not (rm_dir / "rlhflab_rm.json").is_file():
                from rlhflab.rewards.reward_model import train_reward_model

                shutil.rmtree(rm_dir, ignore_errors=True)
                rm = loop.rm.model_copy(update={"base": loop.rm.base or base_config.model.name})
                try:
                    train_reward_model(db, rm_dir, rm, seed=loop.seed + r, calibration=reference_answers,
                                       prompt_format=base_config.model.prompt_format, device=loop.device, quiet=quiet)
                except Stopped as stopped:
                    raise Stopped(f"round {r}: {stopped.what}", stopped.exit_code, rerun) from None
                gc.collect()
                stop_if_asked(r, "training the reward model")
            rm_info = json.loads((rm_dir / "rlhflab_rm.json").read_text())

            # 4. judge score of the current policy (the previous round measured it already)
            before = summary["rounds"][-1]["judge_score_after"] if r > 1 else measure(policy)
            stop_if_asked(r, "measuring the judge score before PPO")

            # 5. PPO with the reward model
            ppo_dir = round_dir / "ppo"
            if not _finished_run(ppo_dir):
                try:
                    _run_ppo(ppo_config(loop, policy, rm_dir), ppo_dir, quiet)
                except Stopped as stopped:  # PPO checkpointed the iteration it reached
                    raise Stopped(f"round {r}: {stopped.what}", stopped.exit_code, rerun) from None
                gc.collect()

            # 6. judge score after, KL, summary
            after = measure(str(ppo_dir / "final"))
            summary["rounds"].append({
                "round": r,
                "pairs": _count_generated(db, policy),
                "labeled_pairs": rm_info["train"]["pairs"] + rm_info["heldout"]["pairs"],
                "rm_accuracy": rm_info["accuracy"],
                "rm_train_accuracy": rm_info["train"]["accuracy"],
                "judge_score_before": before,
                "judge_score_after": after,
                "kl": _last_metric(ppo_dir / "metrics.jsonl", "objective/kl"),
                "policy": policy,
                "rm": str(rm_dir),
                "ppo": str(ppo_dir),
            })  # fmt: skip
            write_json_atomic(summary_path, summary)
            row = summary["rounds"][-1]
            console.print(f"  round {r}: {row['pairs']} pairs, RM accuracy {_fmt(row['rm_accuracy'])}, judge score "
                          f"{_fmt(before)} → {_fmt(after)}, KL {_fmt(row['kl'])} → {summary_path}")
            if r < loop.rounds:
                stop_if_asked(r, "finishing the round")
    return summary


def judge_score(model: str, prompts_file: str | Path, scorer, *, samples_per_prompt: int, max_new_tokens: int,
                temperature: float, top_k: int = 0, top_p: float = 1.0, seed: int = 0, prompt_format: str = "auto",
                system_prompt: str | None = None, device: str = "auto") -> float:
    """Mean score of `scorer` over answers sampled from `model`: every prompt × samples_per_prompt, seeded."""
    from rlhflab.data.prompts import load_prompts, render_prompt
    from rlhflab.evaluation.probes import finite_mean
    from rlhflab.models.loading import load_for_sampling
    from rlhflab.ppo.rollout import generate
    from rlhflab.runs.seeding import seeded

    items = load_prompts(prompts_file)
    lm, tokenizer, dev, fmt, precision = load_for_sampling(model, device, prompt_format=prompt_format)
    texts = [render_prompt(p, tokenizer, fmt, system_prompt) for p in items for _ in range(samples_per_prompt)]
    with seeded(seed, dev), precision.autocast():
        gen = generate(lm, tokenizer, texts, max_new_tokens, temperature, top_k, top_p, with_logprobs=False,
                       batch_size=16)
    shown = [p.display for p in items for _ in range(samples_per_prompt)]
    metadata = [dict(p.metadata) for p in items for _ in range(samples_per_prompt)]
    return finite_mean(list(scorer(shown, gen.texts, metadata)))  # a NaN/inf score is "no score"


def _run_ppo(config: Config, ppo_dir: Path, quiet: bool) -> None:
    from rlhflab.pipelines.train import train
    from rlhflab.runs.checkpoint import latest_checkpoint

    resume = ppo_dir.is_dir() and latest_checkpoint(ppo_dir) is not None
    if ppo_dir.exists() and not resume:
        shutil.rmtree(ppo_dir)  # started but never checkpointed: start over
    train(config, ppo_dir, resume=resume, quiet=quiet)


def _finished_run(ppo_dir: Path) -> bool:
    final = ppo_dir / "final"
    return (final / "config.json").is_file() and any(final.glob("*.safetensors"))


def _generated_by(store, model: str) -> list:
    return [p for p in store.pairs() if p.source == "generate" and p.a.model == model]


def _pairs_from(store, model: str) -> int:
    return len(_generated_by(store, model))


def _count_generated(db: Path, model: str) -> int:
    from rlhflab.preferences.store import PreferenceStore

    with PreferenceStore(db) as store:
        return _pairs_from(store, model)


def _last_metric(path: Path, key: str) -> float | None:
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]).get(key) if lines else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
