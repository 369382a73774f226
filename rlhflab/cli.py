"""The `rlhflab` command. Bad input exits with code 2 and one or two lines that say what to fix."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from rlhflab.errors import UserError

app = typer.Typer(help="Steer a language model with PPO and a KL penalty; measure what changed.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def user_errors(fn):
    """Print UserError as `error: ...` on stderr and exit 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.secho(f"error: {e}", fg="red", err=True)
            raise typer.Exit(2) from None

    return wrapper


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
    from rlhflab.pipelines import load_run_config, train as run_train

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

    from rlhflab.data import load_prompts, render_prompt, resolve_prompt_format
    from rlhflab.models import load_causal_lm, load_tokenizer, pick_device, pick_dtype
    from rlhflab.rollout import generate

    device = pick_device()
    tok = load_tokenizer(model)
    lm = load_causal_lm(model, device, pick_dtype("auto", device)).eval()
    fmt = resolve_prompt_format(tok, prompt_format, model)
    items = load_prompts(prompts)
    texts = [render_prompt(p, tok, fmt) for p in items for _ in range(n)]
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
    from rlhflab.models import load_causal_lm, load_tokenizer, pick_device, pick_dtype
    from rlhflab.rollout import generate

    device = pick_device()
    tok = load_tokenizer(model)
    if not getattr(tok, "chat_template", None):
        raise UserError(f"'{model}' has no chat template; use `rlhflab sample` with plain prompts instead")
    lm = load_causal_lm(model, device, pick_dtype("auto", device)).eval()
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
        gen = generate(lm, tok, [text], max_new_tokens, max(temperature, 1e-5), do_sample=temperature > 0,
                       with_logprobs=False)
        print(f"model> {gen.texts[0]}")
        messages.append({"role": "assistant", "content": gen.texts[0]})


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


def main():  # pragma: no cover
    sys.exit(app())
