"""`rlhflab prefs ...`: import, export, stats, label and judge preference pairs in a SQLite store."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from rlhflab.errors import UserError, user_errors
from rlhflab.preferences.io import export_jsonl, import_jsonl
from rlhflab.preferences.judge import judge_pending
from rlhflab.preferences.label import run_session
from rlhflab.preferences.store import PreferenceStore, Stats

prefs_app = typer.Typer(
    help="Collect A/B preferences durably: import, label (terminal or browser), judge with a reward, export for TRL.",
    no_args_is_help=True,
)

DbOption = Annotated[Path, typer.Option("--db", help="Preference DB (SQLite file).")]
STATES = ("pending", "a", "b", "tie", "skip", "contested")


def _default_labeler() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in containers without a passwd entry
        return "human"


@prefs_app.command("import")
@user_errors
def import_cmd(
    file: Annotated[Path, typer.Argument(help="JSONL of prompt/chosen/rejected or prompt/completion_a/completion_b.")],
    db: DbOption,
    labeler: Annotated[str, typer.Option(help="Labeler recorded for imported chosen/rejected preferences.")] = "import",
    seed: Annotated[int, typer.Option(help="Seed of the coin that places chosen as answer A or B.")] = 0,
) -> None:
    """Import pairs from JSONL; importing the same file twice stores everything once."""
    with PreferenceStore(db) as store:
        counts = import_jsonl(store, file, labeler=labeler, seed=seed)
    typer.echo(
        f"imported {counts.new_pairs + counts.existing_pairs} pairs from {file}: {counts.new_pairs} new, "
        f"{counts.existing_pairs} already stored, {counts.new_labels} new labels"
    )


@prefs_app.command("export")
@user_errors
def export_cmd(
    db: DbOption,
    out: Annotated[Path, typer.Option("--out", help="JSONL to write in TRL's prompt/chosen/rejected format.")],
) -> None:
    """Export preferred pairs for TRL; ties, skips, contested and pending pairs are left out and counted."""
    with PreferenceStore(db, create=False) as store:
        counts = export_jsonl(store, out)
    left_out = ", ".join(f"{n} {state}" for state, n in counts.left_out.items())
    typer.echo(f"wrote {counts.exported} preference rows to {out}; left out: {left_out}")


@prefs_app.command("stats")
@user_errors
def stats_cmd(db: DbOption) -> None:
    """Pairs by state, labels by labeler, and agreement between labelers on shared pairs."""
    with PreferenceStore(db, create=False) as store:
        stats = store.stats()
    _print_stats(Console(), stats)


@prefs_app.command("label")
@user_errors
def label_cmd(
    db: DbOption,
    labeler: Annotated[str | None, typer.Option(help="Your name in the store [default: login name].")] = None,
) -> None:
    """Label pending pairs: a, b, t (tie), s (skip), u (undo last), q (quit); one key per line, pipes work."""
    with PreferenceStore(db, create=False) as store:
        run_session(store, labeler or _default_labeler(), sys.stdin, Console())


@prefs_app.command("serve")
@user_errors
def serve_cmd(
    db: DbOption,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1; 0 picks a free one.")] = 8765,
) -> None:
    """Label in a browser: serves a page on 127.0.0.1 and prints its URL (with an access token); Ctrl-C stops."""
    try:
        from rlhflab.preferences.web import serve  # lazy: the web extra is optional
    except ImportError as e:
        raise UserError(f"prefs serve needs the web extra ({e.name} is missing): pip install 'rlhflab[web]'") from None
    serve(db, port, echo=typer.echo)


@prefs_app.command("judge")
@user_errors
def judge_cmd(
    db: DbOption,
    reward: Annotated[str, typer.Option(help="Reward spec that judges, e.g. vader.")],
    margin: Annotated[float, typer.Option(help="Scores this close or closer are a tie.")] = 0.0,
    labeler: Annotated[str | None, typer.Option(help="Labeler recorded [default: judge:SPEC].")] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs scored per reward call.")] = 32,
) -> None:
    """Label this judge's pending pairs with a reward function (AI feedback)."""
    from rlhflab.rewards.specs import build_reward  # lazy: reward specs may load models

    with PreferenceStore(db, create=False) as store:
        counts = judge_pending(store, build_reward(reward), labeler or f"judge:{reward}", margin, batch_size)
    typer.echo(f"judged {sum(counts.values())} pairs: {counts['a']} a, {counts['b']} b, {counts['tie']} tie")


@prefs_app.command("generate")
@user_errors
def generate_cmd(
    model: Annotated[str, typer.Option("--model", help="Model spec or run directory that samples the answers.")],
    prompts: Annotated[Path, typer.Option("--prompts", help="Prompt file (.jsonl, .csv or .txt), cycled through.")],
    db: DbOption,
    pairs: Annotated[int, typer.Option("--pairs", help="New pairs to store.")],
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 48,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (> 0).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Answers sampled per generate call (two per prompt).")] = 16,
    prompt_format: Annotated[str, typer.Option(help="auto, chat or plain.")] = "auto",
) -> None:
    """Sample two answers per prompt from a model and store them as pending pairs (then `label` or `judge`)."""
    from rlhflab.pipelines.pairs import generate_pairs  # lazy: loads torch and transformers

    counts = generate_pairs(model, prompts, db, pairs, max_new_tokens=max_new_tokens, temperature=temperature,
                            seed=seed, batch_size=batch_size, prompt_format=prompt_format)
    typer.echo(f"stored {counts.stored} new pairs in {db} from {counts.draws} prompts drawn "
               f"({counts.identical} with two identical answers, {counts.existing} already stored)")
    if counts.stored < pairs:
        typer.echo(f"warning: only {counts.stored} of {pairs} pairs: the model keeps repeating itself; "
                   "raise --temperature or --max-new-tokens", err=True)


def _print_stats(console: Console, stats: Stats) -> None:
    console.print(f"pairs: {stats.pairs}")
    states = Table("state", "pairs", title="pairs by state")
    for state in STATES:
        states.add_row(state, str(stats.by_state.get(state, 0)))
    console.print(states)
    if stats.by_labeler:
        labelers = Table("labeler", "a", "b", "tie", "skip", "total", title="labels by labeler")
        for name, counts in stats.by_labeler.items():
            cells = [str(counts.get(c, 0)) for c in ("a", "b", "tie", "skip")]
            labelers.add_row(Text(name), *cells, str(sum(counts.values())))
        console.print(labelers)
    if stats.agreement is None:
        console.print("agreement: no pair labeled (not skipped) by two or more labelers")
        return
    console.print(
        f"agreement: {stats.identical} of {stats.shared_pairs} shared pairs identical ({stats.agreement:.0%})"
    )
    pairwise = Table("labelers", "shared", "agree", "Cohen's kappa", title="agreement by two labelers")
    for row in stats.pairwise:
        kappa = "n/a" if row.kappa is None else f"{row.kappa:.2f}"
        pairwise.add_row(Text(" / ".join(row.labelers)), str(row.shared), f"{row.agree:.0%}", kappa)
    console.print(pairwise)


if __name__ == "__main__":
    prefs_app()
