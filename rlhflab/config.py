"""Run configuration: typed, documented, validated. One YAML recipe holds every parameter of a run.

Batch-size glossary (the one place these words are defined):
  prompts_per_iteration   prompts drawn from the prompt file each iteration            (P)
  samples_per_prompt      answers sampled per prompt                                   (K)
  rollout_batch_size      samples collected per iteration = P × K                      (N)
  minibatch_size          samples per optimizer step; N must be a multiple of it
  micro_batch_size        samples per forward/backward pass; gradients are accumulated over
                          minibatch_size / micro_batch_size passes before each optimizer step
  ppo.epochs              passes over the N samples per iteration, reshuffled every pass
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhflab.errors import UserError
from rlhflab.files import read_yaml, write_atomic


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class LoraConfig(Section):
    enabled: bool = False
    """Train LoRA adapters instead of all weights; the reference is then the base with adapters disabled."""
    r: int = Field(16, ge=1)
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / r)."""
    target_modules: list[str] | str = "all-linear"
    """Modules that get adapters (peft's `target_modules`)."""
    layers: list[int] | None = Field(None, min_length=1)
    """Decoder layers that get adapters (peft's `layers_to_transform`), negative from the top; None: every layer."""


class ModelConfig(Section):
    name: str = "smollm2-135m-instruct"
    """Policy: `smollm2-135m-instruct` (embedded), `tiny` (random, for tests), a local HF dir, a .gguf file or a hub id."""
    prompt_format: Literal["auto", "chat", "plain"] = "auto"
    """`chat` applies the tokenizer's chat template, `plain` feeds raw text; `auto` picks chat when a template exists."""
    system_prompt: str | None = None
    """System message for chat prompts (None: the template's own default)."""
    lora: LoraConfig = LoraConfig()
    """LoRA settings."""
    critic: Literal["separate", "shared"] = "separate"
    """Value model: a separate copy of the policy with a value head, or a value head on the policy trunk."""
    value_head: Literal["linear", "mlp"] = "linear"
    """Value head: one zero-initialised linear layer, or Linear→tanh→Linear (last layer zero-initialised)."""
    critic_init: str | None = None
    """Reward model dir (`rlhflab rm train`) whose trunk and head start the separate critic (None: zero head)."""
    dtype: Literal["auto", "float32", "bfloat16", "bf16-autocast"] = "auto"
    """`bf16-autocast` (fp32 weights, bf16 matmuls), `float32`, `bfloat16` (pure bf16 weights); auto = bf16-autocast on CUDA and bf16-capable CPUs, else float32."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, `cuda:1`, `mps`."""


INHERIT_REWARD = "reward.spec"


class PromptGroup(Section):
    """One prompt set of a scoped recipe: its own reward, share of the rollout batch and KL weight."""

    name: str = Field(min_length=1, pattern=r"^[^/\s]+$")
    """Group name in the logs (group/<name>/...): no spaces or '/'."""
    prompts: str
    """Prompt file of this group (same formats as data.prompts)."""
    share: float = Field(gt=0, le=1)
    """Share of rollout.prompts_per_iteration drawn from this group each iteration; shares sum to 1."""
    reward: str | list[RewardTerm] | None = INHERIT_REWARD
    """Reward of this group: a spec or weighted terms; `reward.spec` (default) the recipe's; null: none (score 0)."""
    kl_scale: float = Field(1.0, ge=0)
    """Multiplier of ppo.kl_coef (β, the adaptive controller's value when adaptive) on this group's answers."""
    retain_kl_coef: float = Field(0.0, ge=0)
    """Weight of the exact KL(π‖π_ref) over the whole vocabulary at this group's answer tokens, in the loss (0: off)."""
    expect: Literal["behaviour", "unchanged"] = "behaviour"
    """`unchanged`: a retain group, where the behaviour should stay at its start rate (else a health alarm)."""


class DataConfig(Section):
    prompts: str = ""
    """Prompt file: JSONL (`prompt` or `messages`; other fields become reward metadata), CSV, or text (one per line)."""
    shuffle: bool = True
    """Draw prompts in a fresh random order each pass over the file."""
    groups: list[PromptGroup] = []
    """Prompt groups instead of data.prompts, each with its own reward, batch share and KL weight (docs/scoped.md)."""
    behaviour: str | None = None
    """Spec whose score > 0 marks an answer as showing the behaviour (group/<name>/behaviour; None: the first term of the first group's reward)."""


class RolloutConfig(Section):
    prompts_per_iteration: int = Field(16, ge=1)
    """Prompts drawn per iteration (P)."""
    samples_per_prompt: int = Field(1, ge=1)
    """Answers sampled per prompt (K)."""
    max_new_tokens: int = Field(32, ge=1)
    """Longest answer in tokens; answers stop earlier at EOS."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_k: int = Field(0, ge=0)
    """Sample from the k most likely tokens (0: off)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (1.0: off)."""
    generation_batch_size: int | None = Field(None, ge=1)
    """Samples generated per `generate` call (None: the whole rollout at once)."""
    sampling_copy: bool = True
    """Where forwards compute in bf16, sample from a bf16 copy of the policy (LoRA merged; half its memory; not FSDP2)."""


class RewardTerm(Section):
    spec: str
    """A reward spec, e.g. `contains:red`, `vader`, `python:my_rewards.py:score`, `http:http://host:8000/score`."""
    weight: float = 1.0
    """Weight in the sum."""
    name: str | None = None
    """Name in the logs (reward/<name>); derived from the spec when omitted."""


class RewardConfig(Section):
    spec: str | list[RewardTerm] = "contains:red"
    """One reward spec, or a list of weighted terms summed into the score."""
    missing_eos_penalty: float | None = None
    """Score given to answers that never emit EOS within max_new_tokens (None: keep their score)."""
    normalization: Literal["none", "scale", "whiten"] = "none"
    """Per prompt group: `scale` divides scores by their std (mean kept), `whiten` also subtracts the mean."""
    clip: float | None = Field(None, gt=0)
    """Clip scores to ±clip after normalisation (None: off)."""


class PPOConfig(Section):
    advantage_estimator: Literal["gae", "reinforce", "rloo", "grpo"] = "gae"
    """`gae` (learned critic), `reinforce` (mean baseline), `rloo` (leave-one-out), `grpo` (group-normalised)."""
    kl_coef: float = Field(0.05, ge=0)
    """β: weight of the KL penalty to the reference (initial value when adaptive)."""
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    """KL estimator optimised and logged as objective/kl (None: k1 in the reward, k3 in the loss; all three are logged)."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Put the KL penalty per token in the reward (classic RLHF) or in the loss (GRPO style; k1 has no gradient there)."""
    adaptive_kl_target: float | None = Field(None, gt=0)
    """Target KL in nats per answer for the adaptive controller (None: fixed β)."""
    adaptive_kl_horizon: float = Field(10000, gt=0)
    """Horizon of the adaptive controller, in samples."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE λ."""
    whiten_advantages: bool | None = None
    """Shift and scale advantages to mean 0, std 1 per batch (None: on, except for grpo, already normalised per group)."""
    advantage_clip: float | None = Field(None, gt=0)
    """Clip advantages to ±advantage_clip after whitening (None: off)."""
    clip_range: float = Field(0.2, gt=0)
    """ε of the clipped surrogate."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 bounding the loss on negative advantages (None: off)."""
    clip_range_value: float | None = Field(0.2, gt=0)
    """ε_v of the clipped value loss (None: unclipped)."""
    value_loss: Literal["mse", "huber"] = "mse"
    """Value regression loss."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss (matters when the critic shares the policy trunk)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus."""
    epochs: int = Field(4, ge=1)
    """PPO epochs over each rollout batch."""
    minibatch_size: int = Field(4, ge=1)
    """Samples per optimizer step."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Samples per forward/backward (None: the whole minibatch)."""
    loss_normalization: Literal["token", "sequence"] = "token"
    """Divide a minibatch's summed token losses by its response tokens (`token`) or average each answer's token mean (`sequence`)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the gradient norm (None: off)."""
    target_approx_kl: float | None = Field(None, gt=0)
    """Stop the iteration's update once the approx-KL passes this (None: off); where is `approx_kl_check`."""
    approx_kl_check: Literal["after_epoch", "before_step"] = "after_epoch"
    """`after_epoch`: an epoch's mean approx-KL stops the epochs left; `before_step`: a minibatch's stops it unstepped."""
    ratio_threshold: float = Field(10.0, gt=1)
    """Skip a minibatch whose mean policy ratio exceeds this (the old TRL guardrail)."""
    critic_warmup_iterations: int = Field(0, ge=0)
    """Iterations at the start during which only the critic steps (policy weights and LR schedule frozen)."""
    recompute_old_logprobs: Literal["auto", "always", "never"] = "auto"
    """Old log-probs from a training-style forward instead of the sampling pass; auto = when computing in bf16."""

    @property
    def optimized_kl_estimator(self) -> str:
        # k1 in the loss has zero expected gradient (docs/ppo.md, detail 8): k3 there, as GRPO
        return self.kl_estimator or ("k3" if self.kl_in == "loss" else "k1")

    @property
    def whitens_advantages(self) -> bool:
        return self.whiten_advantages if self.whiten_advantages is not None else self.advantage_estimator != "grpo"


class TrainConfig(Section):
    iterations: int = Field(20, ge=1)
    """PPO iterations (rollout + update)."""
    learning_rate: float = Field(1e-5, gt=0)
    """Policy learning rate (AdamW)."""
    critic_learning_rate: float | None = Field(None, gt=0)
    """Critic learning rate (None: same as the policy's)."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up, over all optimizer steps of the run."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warm-up."""
    adam_eps: float = Field(1e-5, gt=0)
    """AdamW epsilon (1e-5 rather than 1e-8 tames the first updates; implementation detail 15)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    seed: int = 0
    """Seed of all random streams."""
    checkpoint_every: int = Field(10, ge=0)
    """Save a resumable checkpoint every N iterations (0: only at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """Checkpoints kept on disk (older ones are deleted)."""
    save_final: bool = True
    """Write RUN_DIR/final/ as a plain Hugging Face model directory (LoRA merged)."""
    nonfinite_patience: int = Field(10, ge=1)
    """Iterations in a row with nothing usable (every reward or every step NaN/inf) before checkpoint + exit 3."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward instead of storing them: less memory, ~1 more forward."""


class LogConfig(Section):
    sample_every: int = Field(1, ge=0)
    """Write sample completions to samples.jsonl every N iterations (0: never)."""
    samples_per_log: int = Field(4, ge=1)
    """Completions written each time."""
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    """Extra trackers besides metrics.jsonl, writing inside the run: tensorboard/, mlflow.db (sqlite), wandb/."""
    project: str = "rlhflab"
    """Project name for W&B; the experiment name in MLflow."""
    run_name: str | None = None
    """Run name for trackers (None: the run directory's name)."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """W&B mode; offline works with no network and can be synced later."""


class EvalConfig(Section):
    probes: str | None = None
    """Probe file (YAML: behavior, groups of prompts) evaluated during and after training (None: no probes)."""
    every: int = Field(0, ge=0)
    """Run a small probe evaluation every N iterations (0: only at the end)."""
    samples_per_prompt_during: int = Field(1, ge=1)
    """Samples per probe prompt during training (the final evaluation uses the probe file's own number)."""
    report: bool = True
    """Write report.html / report.md at the end of training."""


class RewardModelConfig(Section):
    """Reward-model training: `rlhflab rm train`, the RLHF loop's `rm:` section, `train_reward_model`."""

    base: str | None = None
    """Backbone: any causal LM spec (None: the recipe's model.name in the RLHF loop, else smollm2-135m-instruct)."""
    lora: bool = True
    """Train LoRA adapters on every linear layer (merged when saved) instead of every weight."""
    lora_r: int = Field(16, ge=1)
    """LoRA rank."""
    lora_alpha: float | None = Field(None, gt=0)
    """LoRA scaling numerator (None: 2·lora_r)."""
    epochs: int = Field(2, ge=1)
    """Passes over the training pairs."""
    lr: float | None = Field(None, gt=0)
    """Learning rate (None: 2e-4 with LoRA, 1e-5 without); AdamW, linear decay to 0."""
    batch_size: int = Field(8, ge=1)
    """Pairs per optimizer step."""
    margin: float = Field(0.0, ge=0)
    """Bradley–Terry margin: loss −log σ(r_chosen − r_rejected − margin)."""
    heldout_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of pairs (whole prompts) held out to measure accuracy."""
    max_length: int = Field(256, ge=2)
    """Longest RM input in tokens (prompt + answer + EOS); longer inputs lose their start."""
    calibration_samples: int = Field(512, ge=2)
    """Most reference-policy answers the mean-0/std-1 normalisation is fitted on (a seeded sample of them)."""
    nonfinite_patience: int = Field(10, ge=1)
    """Optimizer steps in a row skipped for a NaN/inf loss or gradient before training stops (exit 3)."""

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.lora else 1e-5)


class Config(Section):
    """A whole run. Sections: model, data, rollout, reward, ppo, train, log, eval."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()
    eval: EvalConfig = EvalConfig()

    @property
    def rollout_batch_size(self) -> int:
        return self.rollout.prompts_per_iteration * self.rollout.samples_per_prompt

    @property
    def micro_batch_size(self) -> int:
        return self.ppo.micro_batch_size or self.ppo.minibatch_size

    @property
    def uses_critic(self) -> bool:
        return self.ppo.advantage_estimator == "gae"

    @property
    def prompt_groups(self) -> list[PromptGroup]:
        """data.groups, or the single form (data.prompts + reward.spec) as one group named `all`."""
        return self.data.groups or [PromptGroup(name="all", prompts=self.data.prompts, share=1.0)]

    def group_prompt_counts(self) -> list[int]:
        """Prompts drawn per iteration from each group: share × prompts_per_iteration (checked whole)."""
        return [round(g.share * self.rollout.prompts_per_iteration) for g in self.prompt_groups]

    def _check_groups(self) -> None:
        groups, p = self.data.groups, self.rollout.prompts_per_iteration
        if not groups:
            return
        if self.data.prompts:
            raise ValueError("data.prompts and data.groups are both set; list every prompt file under data.groups "
                             "(one group each) and drop data.prompts")
        names = [g.name for g in groups]
        if len(set(names)) < len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"data.groups: the name '{dup}' is used twice; give each group its own name")
        total = sum(g.share for g in groups)
        if abs(total - 1) > 1e-6:
            raise ValueError(f"data.groups: shares sum to {total:g}, not 1; make them add up to 1")
        for g in groups:
            if abs(g.share * p - round(g.share * p)) > 1e-6:
                raise ValueError(f"data.groups.{g.name}.share: {g.share:g} × rollout.prompts_per_iteration {p} = "
                                 f"{g.share * p:g} prompts, not a whole number; pick shares in steps of 1/{p}")

    @model_validator(mode="after")
    def _check_sizes(self) -> "Config":
        self._check_groups()
        n, mb, micro = self.rollout_batch_size, self.ppo.minibatch_size, self.micro_batch_size
        if n % mb:
            raise ValueError(
                f"rollout batch size {n} (prompts_per_iteration × samples_per_prompt) is not a multiple of "
                f"ppo.minibatch_size {mb}; pick a minibatch_size that divides {n}"
            )
        if mb % micro:
            raise ValueError(
                f"ppo.minibatch_size {mb} is not a multiple of ppo.micro_batch_size {micro}; pick a divisor of {mb}"
            )
        if self.model.critic_init is not None and not (self.uses_critic and self.model.critic == "separate"
                                                        and self.model.value_head == "linear"):
            raise ValueError(
                "model.critic_init needs a separate critic with a linear value head: set model.critic=separate, "
                "model.value_head=linear and ppo.advantage_estimator=gae, or drop model.critic_init"
            )
        if self.ppo.critic_warmup_iterations and not self.uses_critic:
            raise ValueError(
                f"ppo.critic_warmup_iterations={self.ppo.critic_warmup_iterations} needs a critic, but "
                f"ppo.advantage_estimator={self.ppo.advantage_estimator} builds none; set it to 0 or use gae"
            )
        if self.ppo.advantage_estimator in ("rloo", "grpo") and self.rollout.samples_per_prompt < 2:
            raise ValueError(
                f"ppo.advantage_estimator={self.ppo.advantage_estimator} needs rollout.samples_per_prompt ≥ 2"
            )
        return self


# ---------------------------------------------------------------------------------------------------
# loading, overrides, errors


def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys += _all_keys(sub, f"{prefix}{name}.")
    return keys


def _describe(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    """The first problem as one line naming the key; unknown keys get the nearest valid one."""
    e = min(err.errors(), key=lambda e: e["type"] != "extra_forbidden")  # a misspelt key also reads as missing
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        keys = _all_keys(model)
        near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
        hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(model.model_fields)}"
        return f"{source}: unknown key '{key}'; {hint}"
    if e["type"] == "missing":
        field = model.model_fields.get(key)
        doc = (field.description or "").rstrip(".") if field is not None else ""
        return f"{source}: missing key '{key}'" + (f" ({doc})" if doc else "")
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "value_error":
        return f"{source}: {msg}"
    return f"{source}: {key}: {msg} (got {e.get('input')!r})"


def validated(model: type[BaseModel], raw: dict, source: str):
    """`model.model_validate(raw)`, with a failure turned into a one-line UserError naming `source` and the key."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise UserError(_describe(e, source, model)) from None


def parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/lists: 0.1 → float, true → bool, null → None, [a, b] → list."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict → dotted keys: `{ppo: {kl_coef: 0.1}}` → `{"ppo.kl_coef": 0.1}` (lists stay values)."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `dotted.key=value` overrides to a raw recipe dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set '{item}': expected dotted.key=value, e.g. --set ppo.kl_coef=0.1")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set '{item}': '{part}' is not a section")
        node[parts[-1]] = parse_value(value)
    return raw


def read_recipe(path: Path, what: str = "recipe") -> dict:
    """The raw mapping of a recipe or a run's saved config.yaml (`what`: "run config")."""
    fix = "pass the path of a YAML recipe (see recipes/)" if what == "recipe" else \
        "the run's config.yaml is damaged; start a new run with `rlhflab train RECIPE --out NEW_DIR`"
    return read_yaml(path, what, fix, "sections (model:, rollout:, ...)")


def config_from_dict(raw: dict, source: str = "config") -> Config:
    return validated(Config, raw, source)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe, apply `--set` overrides, validate. Relative paths in it resolve against its folder."""
    path = Path(path)
    raw = apply_overrides(read_recipe(path), list(overrides))
    config = config_from_dict(raw, str(path))
    return resolve_paths(config, path.parent)


def resolve_paths(config: Config, base: Path) -> Config:
    """Make the config's relative file paths absolute (so the saved config.yaml works from any folder): data,
    probes, critic_init, model.name when it is a path, and the paths inside `python:`, `model:` and
    `hf-classifier:` reward specs. A relative path means the recipe's folder; one that exists only relative to
    the working directory (typed in a `--set` override) means that one."""
    config.data.prompts = _absolute(config.data.prompts, base) if config.data.prompts else ""
    for group in config.data.groups:
        group.prompts = _absolute(group.prompts, base)
        if isinstance(group.reward, str) and group.reward != INHERIT_REWARD:
            group.reward = _reward_spec_paths(group.reward, base)
        for term in group.reward if isinstance(group.reward, list) else []:
            term.spec = _reward_spec_paths(term.spec, base)
    if config.data.behaviour:
        config.data.behaviour = _reward_spec_paths(config.data.behaviour, base)
    config.eval.probes = _absolute(config.eval.probes, base) if config.eval.probes else None
    config.model.critic_init = _absolute(config.model.critic_init, base) if config.model.critic_init else None
    config.model.name = _absolute_if_path(config.model.name, base)
    if isinstance(config.reward.spec, str):
        config.reward.spec = _reward_spec_paths(config.reward.spec, base)
    else:
        for term in config.reward.spec:
            term.spec = _reward_spec_paths(term.spec, base)
    return config


def _absolute(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    found = next((folder / p for folder in (base, Path.cwd()) if (folder / p).exists()), base / p)
    return str(found.resolve())  # not found anywhere: the recipe-relative path, so errors name where it was expected


def _absolute_if_path(name: str, base: Path) -> str:
    """A model name or hub id stays as it is; a path (it exists, or starts with `.`, `/` or `~`) is made absolute."""
    looks_like_path = name.startswith((".", "/", "~")) or any((f / name).exists() for f in (base, Path.cwd()))
    return _absolute(name, base) if looks_like_path else name


def names_a_file(target: str) -> bool:
    """Whether a `python:TARGET:function` reward names a file (`rewards.py`, `dir/x`) rather than a module."""
    return target.endswith(".py") or "/" in target or "\\" in target


def _reward_spec_paths(spec: str, base: Path) -> str:
    kind, _, arg = spec.strip().partition(":")
    if kind == "not" and arg:
        return f"not:{_reward_spec_paths(arg, base)}"
    if kind == "python":
        target, sep, function = arg.rpartition(":")
        return f"python:{_absolute(target, base)}:{function}" if sep and names_a_file(target) else spec
    if kind == "model" and arg:
        return f"model:{_absolute(arg, base)}"
    if kind == "hf-classifier" and arg:
        source, sep, label = arg.partition(":")
        return f"hf-classifier:{_absolute_if_path(source, base)}{sep}{label}"
    return spec


def save_config(config: Config, path: Path) -> None:
    write_atomic(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
