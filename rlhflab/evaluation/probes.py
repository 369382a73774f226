"""Probe evaluation: what an edit changed, where it spread, and what it cost.

A probe file names a behaviour (any reward spec) and groups of prompts (LieRL's routes: trained, related,
unrelated, capability). For each group and each side, the policy and the reference, `evaluate` samples
answers and measures (per side, on that side's own samples; T = the probe temperature):

    behavior_rate  share of answers whose behaviour reward is > 0
    reward_mean    mean behaviour reward
    kl_k1, kl_k3   mean over answers of Σ_t k(log π_side,T(y_t) − log π_ref,T(y_t)): the sequence KL to the
                   reference (k1 = log-ratio, k3 = (r − 1) − log r ≥ 0). The side's log-probs come from its sampling
                   pass, the reference's from a forward pass (`rollout.forward_answers`); the reference's KL
                   to itself is exactly 0 (one tensor on both sides).
    entropy        mean per-token entropy of the side's own model at T (nats/token)
    nll_reference  mean per-token −log π_ref,T(y_t) of the answers: a fluency proxy, how unlike the reference's
                   own text they are (nats/token)
    distinct_1/2   unique / total word n-grams over the group's answers
    self_bleu      mean BLEU of each answer against the other answers of its group (1 = all the same)
    length         mean answer length in tokens (EOS included)
    eos_rate       share of answers that ended with EOS within max_new_tokens
    correct_rate   share of answers matching their prompt's `expected` pattern, over the group's prompts that
                   have one (only groups with such prompts: e.g. capability questions with known answers)

plus greedy answers of both sides side by side per prompt (with `policy_correct` / `reference_correct` where
the prompt has a pattern). `run_eval` is the `rlhflab eval` job: load the
models, evaluate, write EVAL_DIR/eval.json and EVAL_DIR/answers.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator
from torch import nn

from rlhflab.config import validated
from rlhflab.data.diversity import distinct_n, self_bleu
from rlhflab.data.prompts import Prompt, render_prompt
from rlhflab.distributed.processes import Processes
from rlhflab.errors import UserError
from rlhflab.files import make_dir, read_yaml
from rlhflab.ppo.kl import kl_estimators
from rlhflab.ppo.rollout import Generation, forward_answers, gather_generation, generate
from rlhflab.ppo.stats import masked_mean
from rlhflab.runs.seeding import sample_uniforms

SIDES = ("policy", "reference")
GENERATION_BATCH = 32  # answers per `generate` call
FORWARD_BATCH = 32  # answers per scoring forward pass
EVAL_STREAM = 3  # runs.seeding stream of the probe samples (the trainer uses 1 and 2)
METRICS = (
    "behavior_rate", "reward_mean", "kl_k1", "kl_k3", "entropy", "nll_reference", "distinct_1", "distinct_2",
    "self_bleu", "length", "eos_rate",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# probe files


class Probes(BaseModel):
    """A probe file: the behaviour measured, how to sample, and named groups of prompts."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    behavior: str
    """Reward spec of the behaviour measured (e.g. `contains:red`); an answer shows it when its reward is > 0."""
    samples_per_prompt: int = Field(4, ge=1)
    """Answers sampled per prompt and side."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature; log-probs, KL, entropy and NLL are computed at the same temperature."""
    max_new_tokens: int = Field(40, ge=1)
    """Longest answer in tokens."""
    groups: dict[str, list[str]]
    """Group name → prompts (plain user messages), e.g. trained / related / unrelated / capability."""
    unchanged: list[str] = []
    """Groups the edit should leave alone: a behaviour rate above the reference's there is a health alarm
    (empty: the groups named unrelated* and capability*)."""
    expected: dict[str, str] = {}
    """Prompt → regex (case-insensitive) that a correct answer contains, e.g. "What is 7 + 5?": '\\b12\\b'."""

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _reward: object = PrivateAttr(None)

    @field_validator("groups")
    @classmethod
    def _check_groups(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        if not groups:
            raise ValueError("'groups' is empty; add at least one group of prompts, e.g. trained: [\"...\"]")
        for name, prompts in groups.items():
            if not name or "/" in name:
                raise ValueError(f"group name {name!r} must be non-empty without '/' (it becomes eval/<group>/...)")
            if not prompts:
                raise ValueError(f"group '{name}' has no prompts; list at least one prompt under it")
            if any(not p.strip() for p in prompts):
                raise ValueError(f"group '{name}' holds an empty prompt; remove it")
        return groups

    @model_validator(mode="after")
    def _check_unchanged(self) -> "Probes":
        unknown = [name for name in self.unchanged if name not in self.groups]
        if unknown:
            raise ValueError(f"unchanged: no group named '{unknown[0]}'; list names from groups: "
                             f"{', '.join(self.groups)}")
        prompts = {p for group in self.groups.values() for p in group}
        for prompt, pattern in self.expected.items():
            if prompt not in prompts:
                raise ValueError(f"expected: {prompt!r} is not a prompt of any group; copy it from groups verbatim")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"expected: {prompt!r}: {pattern!r} is not a valid regex ({e})") from None
        return self

    def correct(self, prompts: list[str], answers: list[str]) -> list[bool | None]:
        """Per answer, whether it matches its prompt's `expected` pattern; None where the prompt has none."""
        return [None if p not in self.expected else re.search(self.expected[p], a, re.IGNORECASE) is not None
                for p, a in zip(prompts, answers)]

    def measuring(self, behavior: str) -> "Probes":
        """The same probes measuring another behaviour, given on the command line (`python:` paths resolve against
        the working directory), e.g. "blue" on the prompts of an edit to red: what the edit displaced."""
        probes = self.model_copy(update={"behavior": behavior})
        probes._base_dir, probes._reward = Path.cwd(), None
        return probes

    def behavior_reward(self):
        """The behaviour as a reward callable, built once (`python:` paths resolve against the probe file's folder)."""
        if self._reward is None:
            from rlhflab.rewards.specs import build_reward

            self._reward = build_reward(self.behavior, self._base_dir)
        return self._reward


def load_probes(path: str | Path) -> Probes:
    """Read and check a probe file; every problem is a one-line UserError naming the file and key (or line)."""
    path = Path(path)
    raw = read_yaml(path, "probe file", "pass a YAML file like recipes/data/sky_probes.yaml",
                    "behavior:, groups: (and optionally samples_per_prompt:, temperature:, max_new_tokens:)")
    probes = validated(Probes, raw, str(path))
    probes._base_dir = path.resolve().parent
    return probes


# ---------------------------------------------------------------------------------------------------
# evaluation


def _side_metrics(
    gen: Generation, rows: list[int], rewards: list[float], correct: list[bool | None], logprobs: torch.Tensor,
    entropy: torch.Tensor, ref_logprobs: torch.Tensor,
) -> dict[str, float]:
    """The metrics of one group on one side, over the answers at `rows`."""
    idx = torch.tensor(rows, device=gen.response_mask.device)
    mask = gen.response_mask[idx]  # (n, T)
    kl = kl_estimators(logprobs[idx], ref_logprobs[idx])  # k1/k2/k3 -> (n, T)
    texts = [gen.texts[i] for i in rows]
    group_rewards = [rewards[i] for i in rows]
    checked = [correct[i] for i in rows if correct[i] is not None]
    return {
        "behavior_rate": sum(r > 0 for r in group_rewards) / len(rows),  # a NaN/inf reward ("none") is not > 0
        "reward_mean": finite_mean(group_rewards),
        "kl_k1": (kl["k1"] * mask).sum(1).mean().item(),
        "kl_k3": (kl["k3"] * mask).sum(1).mean().item(),
        "entropy": masked_mean(entropy[idx], mask).item(),
        "nll_reference": -masked_mean(ref_logprobs[idx], mask).item(),
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "self_bleu": self_bleu(texts),
        "length": mask.sum(1).mean().item(),
        "eos_rate": gen.has_eos[idx].float().mean().item(),
        **({"correct_rate": sum(checked) / len(checked)} if checked else {}),
    }


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values (a NaN/inf reward means "no reward"); NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


@torch.no_grad()
def evaluate(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer,
    probes: Probes,
    *,
    prompt_format: str,
    system_prompt: str | None = None,
    samples_per_prompt: int | None = None,
    reference_context: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    greedy: bool = True,
    seed: int = 0,
    sides: tuple[str, ...] = SIDES,
    logprobs_from_forward: bool = False,
    processes: Processes | None = None,
    samplers: dict[str, Callable[[], nn.Module]] | None = None,
) -> tuple[dict, list[dict]]:
    """Measure each probe group on each side; return (result, greedy answer rows).

    `reference` may be the `policy` module itself with `reference_context` a callable returning a context
    manager that turns it into the reference (peft's `policy.disable_adapter`); it wraps every reference
    forward and generation. Each side samples from the same seed, so a model evaluated against itself gives
    the same numbers on both sides, and the caller's RNG state is left untouched. `sides=("policy",)` skips
    the reference's own samples (its log-probs are still used for the policy's KL); `greedy=False` skips the
    greedy answers (rows = []). `logprobs_from_forward` takes each side's log-probs from a forward pass
    rather than its sampling pass: set it when computing in bf16, where the two round differently and a model
    would otherwise show a KL to itself (docs/ppo.md, Precision). With `processes` (a data-parallel run), each
    process samples its share of the answers and every process returns the whole result: answer i draws from
    its own stream, so the numbers do not depend on how many processes share the work. `samplers` maps a side to
    a callable returning the model its answers are sampled from (`models.sampling_copy`) where that is not
    the side's own module; its log-probs then come from a forward (`logprobs_from_forward` must be set).

    result: {"behavior": spec, "samples_per_prompt", "temperature", "max_new_tokens", "unchanged": [NAME],
             "groups": {NAME: {SIDE: {metric: value}}}, "elapsed_s"}
    rows:   {"group", "prompt", "policy", "reference", "policy_reward", "reference_reward"} per prompt
    """
    if not sides or set(sides) - set(SIDES):
        raise ValueError(f"sides must be a non-empty subset of {SIDES}, got {sides!r}")
    samplers = samplers or {}
    if samplers and not logprobs_from_forward:
        raise ValueError("samplers need logprobs_from_forward: a sampling copy's log-probs are not the side's own")
    started = time.perf_counter()
    k = samples_per_prompt or probes.samples_per_prompt
    reward = probes.behavior_reward()
    items = [(group, prompt) for group, prompts in probes.groups.items() for prompt in prompts]
    rendered = [render_prompt(Prompt(text=p), tokenizer, prompt_format, system_prompt) for _, p in items]
    texts = [text for text in rendered for _ in range(k)]  # (B,) = prompts × k, grouped by prompt
    shown = [p for _, p in items for _ in range(k)]
    rows_of: dict[str, list[int]] = {g: [] for g in probes.groups}
    for i, (group, _) in enumerate(items):
        rows_of[group] += range(i * k, (i + 1) * k)
    models = {"policy": (policy, contextlib.nullcontext), "reference": (reference, reference_context)}

    def sampler(side: str) -> nn.Module:
        """The model the side's answers are drawn from: its sampling copy, or its own module."""
        return samplers[side]() if side in samplers else models[side][0]

    processes = processes or Processes()
    mine = processes.share(len(texts))
    uniforms = sample_uniforms((seed, EVAL_STREAM), range(len(texts))[mine], probes.max_new_tokens)

    groups: dict[str, dict[str, dict]] = {g: {} for g in probes.groups}
    for side in sides:
        model, context = models[side]
        with context():  # both sides draw the same numbers: sample i from the stream (seed, EVAL_STREAM, i)
            gen = generate(sampler(side), tokenizer, texts[mine], probes.max_new_tokens, probes.temperature,
                           batch_size=GENERATION_BATCH, uniforms=uniforms)
        # the side's own log-probs come from its sampling pass; the reference's own answers need no second model
        logprobs = gen.logprobs
        if logprobs_from_forward:
            with context():
                logprobs = forward_answers(gen, model, probes.temperature, FORWARD_BATCH).logprobs
        ref_logprobs = logprobs
        if side != "reference":
            with reference_context():
                ref_logprobs = forward_answers(gen, reference, probes.temperature, FORWARD_BATCH).logprobs
        gen = gather_generation(gen, processes, tokenizer.pad_token_id)
        logprobs, ref_logprobs = processes.gather(logprobs), processes.gather(ref_logprobs)
        rewards = reward(shown, gen.texts, [{} for _ in texts])
        correct = probes.correct(shown, gen.texts)
        for group, rows in rows_of.items():
            groups[group][side] = _side_metrics(gen, rows, rewards, correct, logprobs, gen.entropy, ref_logprobs)

    answers: list[dict] = []
    if greedy:
        greedy_texts = {}
        mine = processes.share(len(rendered))
        for side in SIDES:
            _, context = models[side]
            with context():
                gen = generate(sampler(side), tokenizer, rendered[mine], probes.max_new_tokens, do_sample=False,
                               with_logprobs=False, batch_size=GENERATION_BATCH)
            texts_out = processes.gather_objects(gen.texts)
            greedy_texts[side] = (texts_out, reward([p for _, p in items], texts_out, [{} for _ in items]))
        for i, (group, prompt) in enumerate(items):
            row = {
                "group": group, "prompt": prompt,
                "policy": greedy_texts["policy"][0][i], "reference": greedy_texts["reference"][0][i],
                "policy_reward": greedy_texts["policy"][1][i], "reference_reward": greedy_texts["reference"][1][i],
            }  # fmt: skip
            if prompt in probes.expected:
                for side in SIDES:
                    row[f"{side}_correct"] = probes.correct([prompt], [row[side]])[0]
            answers.append(row)
    result = {
        "behavior": probes.behavior,
        "samples_per_prompt": k,
        "temperature": probes.temperature,
        "max_new_tokens": probes.max_new_tokens,
        "unchanged": list(probes.unchanged),
        "groups": groups,
        "elapsed_s": time.perf_counter() - started,
    }
    return result, answers


# ---------------------------------------------------------------------------------------------------
# outputs


def eval_metrics(result: dict) -> dict[str, float]:
    """The policy side flattened for metrics.jsonl: {"eval/<group>/<metric>": value}."""
    return {
        f"eval/{group}/{metric}": value
        for group, sides in result["groups"].items()
        for metric, value in sides.get("policy", {}).items()
    }


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3g}"


def format_table(result: dict) -> str:
    """A markdown table: one row per group and side with behaviour rate, reward, KL, NLL, distinct-2, length and
    the share of correct answers (– where the group has no expected answers)."""
    header = ["group", "side", "behaviour rate", "reward", "KL k1", "KL k3", "NLL ref (nats/tok)", "distinct-2",
              "length (tok)", "correct"]
    keys = ["behavior_rate", "reward_mean", "kl_k1", "kl_k3", "nll_reference", "distinct_2", "length", "correct_rate"]
    lines = [
        f"behaviour `{result.get('behavior', '?')}` · {result.get('samples_per_prompt', '?')} samples per prompt "
        f"at T={result.get('temperature', '?')} · {result.get('elapsed_s', 0.0):.0f} s",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for group, sides in result["groups"].items():
        for side in SIDES:
            if side in sides:
                cells = [_cell(sides[side].get(key)) for key in keys]
                lines.append("| " + " | ".join([group, side, *cells]) + " |")
    return "\n".join(lines)


def write_eval(out_dir: str | Path, result: dict, answers: list[dict]) -> tuple[Path, Path]:
    """Write OUT_DIR/eval.json and OUT_DIR/answers.jsonl (the files `rlhflab report` reads)."""
    out_dir = make_dir(out_dir)
    eval_path, answers_path = out_dir / "eval.json", out_dir / "answers.jsonl"
    eval_path.write_text(json.dumps(result, indent=2) + "\n")
    answers_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in answers))
    return eval_path, answers_path


# ---------------------------------------------------------------------------------------------------
# the `rlhflab eval` job


def _resolve_sides(model: str, reference: str | None) -> dict:
    """Policy/reference specs, prompt format, system prompt and dtype/device from a model spec or a run dir."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.yaml").is_file():
        from rlhflab.runs.layout import load_run_config

        config = load_run_config(path)
        if not (path / "final" / "config.json").is_file():
            raise UserError(f"run '{path}' has no final/ model (unfinished run, or train.save_final was off); "
                            f"finish it with: rlhflab train --resume {path}")
        return {
            "policy": str(path / "final"), "reference": reference or config.model.name,
            "prompt_format": config.model.prompt_format, "system_prompt": config.model.system_prompt,
            "dtype": config.model.dtype, "device": config.model.device,
        }  # fmt: skip
    if reference is None:
        raise UserError(f"'{model}' is not a run directory, so there is no base model to compare with; "
                        f"add --reference MODEL (e.g. --reference {model} for its own baseline)")
    return {"policy": model, "reference": reference, "prompt_format": "auto", "system_prompt": None,
            "dtype": "auto", "device": "auto"}


def run_eval(model: str, probes_path: str | Path | Probes, out_dir: str | Path, reference: str | None = None,
             seed: int = 0) -> dict:
    """Evaluate a run (policy = RUN_DIR/final, reference = its base model) or any two models on a probe file.

    `model` is a run directory or a model spec; `reference` overrides the run's base model (and is required
    for a plain model spec); `probes_path` may also be loaded Probes. Writes OUT_DIR/eval.json and
    OUT_DIR/answers.jsonl; returns the result dict (with "policy" and "reference" added).
    """
    from rlhflab.models.loading import load_for_sampling, load_tokenizer

    probes = probes_path if isinstance(probes_path, Probes) else load_probes(probes_path)
    probes.behavior_reward()  # a bad spec fails before any model loads
    spec = _resolve_sides(str(model), reference)
    same = spec["reference"] == spec["policy"]
    if not same and len(load_tokenizer(spec["reference"])) != len(load_tokenizer(spec["policy"])):
        raise UserError(f"policy '{spec['policy']}' and reference '{spec['reference']}' use different tokenizers; "
                        "the KL between them is undefined. Compare models that share a vocabulary")
    policy = load_for_sampling(spec["policy"], spec["device"], spec["dtype"], spec["prompt_format"])
    ref = policy if same else load_for_sampling(spec["reference"], policy.device, spec["dtype"])
    with policy.precision.autocast():
        result, answers = evaluate(policy.model, ref.model, policy.tokenizer, probes,
                                   prompt_format=policy.prompt_format, system_prompt=spec["system_prompt"], seed=seed,
                                   logprobs_from_forward=policy.precision.bf16_compute)
    result = {"policy": spec["policy"], "reference": spec["reference"], **result}
    write_eval(out_dir, result, answers)
    return result
