"""The `rlhflab` command. Bad input exits with code 2 and one or two lines that say what to fix."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from rlhflab.cli.prefs import prefs_app
from rlhflab.config import RewardModelConfig
from rlhflab.errors import UserError, user_errors
from rlhflab.files import make_dir

app = typer.Typer(help="Steer a language model with PPO and a KL penalty; measure what changed.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.add_typer(prefs_app, name="prefs")


@app.callback()
def _process_settings(ctx: typer.Context):
    from rlhflab.distributed.launch import launched
    from rlhflab.models.loading import quiet_transformers

    if launched() and ctx.invoked_subcommand != "train":
        typer.secho(f"error: only `rlhflab train` runs on several processes; run `rlhflab {ctx.invoked_subcommand}` "
                    "without a launcher", fg="red", err=True)
        raise typer.Exit(2)
    quiet_transformers()  # the command prints its own progress; transformers' bars and advisories are noise here


@app.command()
@user_errors
def train(
    recipe: Optional[Path] = typer.Argument(None, help="YAML recipe (see recipes/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to create."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key: --set ppo.kl_coef=0.1 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Train a policy with PPO: rollouts → rewards → advantages → clipped updates, KL to the reference."""
    from rlhflab.config import apply_overrides, config_from_dict, load_config
    from rlhflab.pipelines.train import train as run_train
    from rlhflab.runs.layout import load_run_config

    if resume is not None:
        config = load_run_config(resume)
        if set_:
            config = config_from_dict(apply_overrides(config.model_dump(mode="json"), set_), "--set")
        run_train(config, resume, resume=True, quiet=quiet)
        return
    if recipe is None or out is None:
        raise UserError("give a recipe and an output folder: rlhflab train RECIPE.yaml --out RUN_DIR "
                        "(or --resume RUN_DIR)")
    run_train(load_config(recipe, set_), out, quiet=quiet)


@app.command()
@user_errors
def sample(
    model: str = typer.Argument(..., help="Model spec or run directory."),
    prompts: Path = typer.Option(..., "--prompts", help="Prompt file (.jsonl, .csv or .txt)."),
    max_new_tokens: int = typer.Option(64, help="Longest answer in tokens."),
    temperature: float = typer.Option(0.7, help="Sampling temperature (0: greedy)."),
    n: int = typer.Option(1, help="Answers per prompt."),
    prompt_format: str = typer.Option("auto", help="auto, chat or plain."),
):
    """Print answers of a model to a prompt file as JSON lines."""
    import json

    from rlhflab.data.prompts import load_prompts, render_prompt
    from rlhflab.models.loading import load_for_sampling
    from rlhflab.ppo.rollout import generate

    items = load_prompts(prompts)
    lm, tok, _, fmt, precision = load_for_sampling(model, prompt_format=prompt_format)
    texts = [render_prompt(p, tok, fmt) for p in items for _ in range(n)]
    with precision.autocast():
        gen = generate(lm, tok, texts, max_new_tokens, max(temperature, 1e-5), do_sample=temperature > 0,
                       with_logprobs=False, batch_size=16)
    for i, answer in enumerate(gen.texts):
        print(json.dumps({"prompt": items[i // n].display, "completion": answer}))


@app.command()
@user_errors
def chat(
    model: str = typer.Argument(..., help="Model spec or run directory."),
    max_new_tokens: int = typer.Option(128, help="Longest answer in tokens."),
    temperature: float = typer.Option(0.7, help="Sampling temperature (0: greedy)."),
    system_prompt: Optional[str] = typer.Option(None, help="System message."),
):
    """Chat with a model in the terminal (empty line or Ctrl-D to quit)."""
    from rlhflab.models.loading import load_for_sampling
    from rlhflab.ppo.rollout import generate

    lm, tok, _, fmt, precision = load_for_sampling(model)
    if fmt != "chat":
        raise UserError(f"'{model}' has no chat template; use `rlhflab sample` with plain prompts instead")
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        with precision.autocast():
            gen = generate(lm, tok, [text], max_new_tokens, max(temperature, 1e-5), do_sample=temperature > 0,
                           with_logprobs=False)
        print(f"model> {gen.texts[0]}")
        messages.append({"role": "assistant", "content": gen.texts[0]})


@app.command("eval")
@user_errors
def eval_(
    run_dir: Optional[str] = typer.Argument(
        None, help="Run directory: policy = RUN_DIR/final, reference = the run's base model."),
    probes: Path = typer.Option(..., "--probes", help="Probe file (YAML: behavior, groups of prompts)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for eval.json and answers.jsonl "
                                                                 "(default: RUN_DIR/eval)."),
    model: Optional[str] = typer.Option(None, "--model", help="Policy model spec, instead of a run directory."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference model spec (default for a run: "
                                                                      "its base model)."),
    seed: int = typer.Option(0, help="Sampling seed (evaluations are repeatable)."),
    behavior: Optional[str] = typer.Option(
        None, "--behavior", help="Reward spec measured instead of the probe file's behavior, e.g. "
                                 "'regex:(?i)\\bblue\\b' for what an edit to red displaced."),
):
    """Compare a policy with its reference on probe groups: behaviour rate, reward, KL, fluency, diversity."""
    from rlhflab.evaluation.probes import format_table, load_probes, run_eval

    if (run_dir is None) == (model is None):
        raise UserError("give a run directory or --model (not both): rlhflab eval RUN_DIR --probes P.yaml, or "
                        "rlhflab eval --model M --reference R --probes P.yaml --out EVAL_DIR")
    if out is None:
        if run_dir is None:
            raise UserError("--model needs --out EVAL_DIR (where eval.json and answers.jsonl go)")
        out = Path(run_dir) / "eval"
    checked = load_probes(probes)
    if behavior is not None:
        checked = checked.measuring(behavior)
    checked.behavior_reward()  # a bad behaviour spec fails before any model loads
    make_dir(out)  # and so does an --out that cannot be created
    prompts = sum(map(len, checked.groups.values()))
    typer.echo(f"evaluating {run_dir or model}: {prompts} probe prompts × {checked.samples_per_prompt} samples, "
               "on the policy and on the reference (minutes for the embedded model on a CPU)", err=True)
    result = run_eval(run_dir or model, checked, out, reference=reference, seed=seed)
    print(format_table(result))
    print(f"\nwrote {out / 'eval.json'} and {out / 'answers.jsonl'}")


@app.command()
@user_errors
def report(run_dir: Path = typer.Argument(..., help="Run directory written by rlhflab train.")):
    """Write RUN_DIR/report.html (self-contained) and RUN_DIR/report.md: curves, probe table, health notes."""
    from rlhflab.evaluation.report import write_report

    html_path, md_path = write_report(run_dir)
    print(html_path)
    print(md_path)


@app.command("export")
@user_errors
def export(
    run_dir: str = typer.Argument(..., help="Run directory (for gguf also a model directory, .gguf or model spec)."),
    format_: str = typer.Option(..., "--format", "-f", help="gguf (llama.cpp), adapter (PEFT, LoRA runs) or hf "
                                                           "(merged Hugging Face directory)."),
    out: Path = typer.Option(..., "--out", "-o", help="FILE.gguf for gguf; a new folder for adapter and hf."),
    dtype: str = typer.Option("f32", "--dtype", help="gguf only: f32, f16 or q8_0 (2-D weights; norms stay f32)."),
):
    """Export a trained model: GGUF for llama.cpp clients, a PEFT adapter, or a Hugging Face directory with its card."""
    from rlhflab.export.run import export_run

    typer.echo(f"exporting {run_dir} as {format_} → {out}", err=True)
    print(export_run(run_dir, format_, out, dtype))


@app.command("config")
def show_config():
    """Print every config key with its default and description."""
    from rlhflab.config import Config

    def walk(model, prefix=""):
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if hasattr(value, "model_fields"):
                walk(value, f"{prefix}{name}.")
            else:
                print(f"{prefix}{name} = {value!r}  # {field.description or ''}")

    walk(Config())


rm_app = typer.Typer(help="Reward models from preferences (Bradley–Terry).", no_args_is_help=True)
app.add_typer(rm_app, name="rm")


def _rm_option(key: str, *flags: str):
    """An `rm train` option that sets RewardModelConfig.<key>, with that field's docstring and default."""
    field = RewardModelConfig.model_fields[key]
    default = "" if field.default is None else f" (default: {field.default})"
    return typer.Option(None, *flags, help=field.description + default, show_default=False)


@rm_app.command("train")
@user_errors
def rm_train(
    db: str = typer.Option(..., "--db", help="Preference DB, or a JSONL of prompt/chosen/rejected (TRL format)."),
    out: Path = typer.Option(..., "--out", "-o", help="RM_DIR to create (use it as reward: model:RM_DIR)."),
    base: Optional[str] = _rm_option("base", "--base"),
    lora: Optional[bool] = _rm_option("lora", "--lora/--no-lora"),
    lora_r: Optional[int] = _rm_option("lora_r", "--lora-r"),
    epochs: Optional[int] = _rm_option("epochs", "--epochs"),
    lr: Optional[float] = _rm_option("lr", "--lr"),
    batch_size: Optional[int] = _rm_option("batch_size", "--batch-size"),
    margin: Optional[float] = _rm_option("margin", "--margin"),
    heldout_fraction: Optional[float] = _rm_option("heldout_fraction", "--heldout-fraction"),
    max_length: Optional[int] = _rm_option("max_length", "--max-length"),
    calibration_samples: Optional[int] = _rm_option("calibration_samples", "--calibration-samples"),
    set_: list[str] = typer.Option([], "--set", help="Set any reward-model key (the RLHF loop's rm: section): "
                                                     "--set lora_alpha=8 (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, the adapters and the batch order."),
    prompt_format: str = typer.Option("auto", "--prompt-format", help="auto, chat or plain (as the policy sees prompts)."),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="JSONL of prompt/completion samples of the reference policy (what `rlhflab "
                                    "sample` prints) to normalise on (default: the training answers)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
):
    """Train a reward model: Bradley–Terry on chosen/rejected pairs, held-out accuracy, calibration, normalisation."""
    import json

    from rlhflab.config import apply_overrides, validated
    from rlhflab.models.loading import keep_freed_memory
    from rlhflab.rewards.reward_model import train_reward_model

    options = {"base": base, "lora": lora, "lora_r": lora_r, "epochs": epochs, "lr": lr, "batch_size": batch_size,
               "margin": margin, "heldout_fraction": heldout_fraction, "max_length": max_length,
               "calibration_samples": calibration_samples}
    raw = apply_overrides({k: v for k, v in options.items() if v is not None}, set_)
    config = validated(RewardModelConfig, raw, "rm train")
    samples = None
    if calibration is not None:
        from rlhflab.data.prompts import load_prompts

        rows = load_prompts(calibration)  # JSONL: prompt + completion (other fields land in metadata)
        if any("completion" not in p.metadata for p in rows):
            raise UserError(f"{calibration}: every line needs 'prompt' and 'completion' (as `rlhflab sample` prints)")
        samples = [(p.display, str(p.metadata["completion"])) for p in rows]
    keep_freed_memory()  # a training job: large gradient buffers stay in the heap between steps
    info = train_reward_model(db, out, config, seed=seed, prompt_format=prompt_format, calibration=samples,
                              quiet=quiet)
    for split in ("train", "heldout"):
        m = info[split]
        acc = "n/a" if m["accuracy"] is None else f"{m['accuracy']:.1%}"
        print(f"{split}: {m['pairs']} pairs, accuracy {acc}")
    print(f"calibration ({info['calibration_table_on']} pairs): confidence bin, pairs, predicted, observed")
    for row in info["calibration_table"]:
        if row["pairs"]:
            print(f"  {row['bin']}  {row['pairs']:5d}  {row['predicted']:.3f}  {row['observed']:.3f}")
    print(f"normalised on {info['calibration_samples']} {info['calibration_source']}: gain {info['gain']:.6g}, "
          f"bias {info['bias']:.6g}")
    print(json.dumps({"out": str(out), "accuracy": info["accuracy"]}))


@app.command("rlhf")
@user_errors
def rlhf(
    loop: Path = typer.Argument(..., help="Loop file (YAML), e.g. recipes/rlhf_loop.yaml."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder; re-running with it continues where it stopped."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
):
    """The RLHF loop: sample pairs from the policy, label (judge or human), train a reward model, PPO; K rounds."""
    from rlhflab.pipelines.rlhf_loop import run_loop

    summary = run_loop(loop, out, quiet=quiet)
    if "waiting_for_labels" not in summary:
        print(out / "summary.json")


@app.command("sweep")
@user_errors
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep file (YAML: recipe, grid, seeds, set), e.g. "
                                                "sweeps/kl_ablation.yaml."),
    out: Path = typer.Option(..., "--out", "-o", help="Sweep folder; re-running with it skips finished runs."),
    compare_: bool = typer.Option(True, "--compare/--no-compare", help="Write OUT/compare/ when the runs are done."),
):
    """Run every grid combination × seed of a sweep, one after another; then compare them."""
    from rlhflab.evaluation.compare import compare_sweep
    from rlhflab.pipelines.sweep import run_sweep

    run_sweep(sweep_file, out, echo=lambda line: typer.echo(line, err=True))
    print(out / "sweep.json")
    if compare_:
        for path in compare_sweep(out, out / "compare"):
            print(path)


@app.command("compare")
@user_errors
def compare(
    run_dirs: Optional[list[Path]] = typer.Argument(None, help="Run directories to compare."),
    sweep_dir: Optional[Path] = typer.Option(None, "--sweep", help="A sweep folder: its runs, grouped by grid values."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for compare.html, compare.md and plots/ "
                                                                 "(default with --sweep: SWEEP_DIR/compare)."),
    label: list[str] = typer.Option([], "--label", help="Group label per run directory, in order (repeatable); "
                                                        "default: the config keys that differ, seed left out."),
):
    """Compare runs: reward, KL, distinct-2, entropy with bands over seeds; reward–KL frontier; final-number table."""
    from rlhflab.evaluation.compare import compare as compare_runs
    from rlhflab.evaluation.compare import compare_sweep

    if bool(run_dirs) == (sweep_dir is not None):
        raise UserError("give run directories or --sweep (not both): rlhflab compare RUN_DIR... --out DIR, or "
                        "rlhflab compare --sweep SWEEP_DIR --out DIR")
    if sweep_dir is not None:
        paths = compare_sweep(sweep_dir, out)
    else:
        if out is None:
            raise UserError("give --out DIR: the folder for compare.html, compare.md and plots/")
        paths = compare_runs(run_dirs, out, labels=label or None)
    for path in paths:
        print(path)


def main():  # pragma: no cover
    sys.exit(app())
