"""Terminal labeling: show a prompt and two answers, read a key, commit the label, repeat.

Input is line-based so the same loop serves a person at a terminal and keys piped from a script
(`printf 'a\\nb\\nt\\n' | rlhflab prefs label --db prefs.db`): each line's first character is the key.
A label is committed before the "saved" line is printed and before the next pair is shown, so whatever
was acknowledged survives a crash. The next pair is always the first one this labeler has not labeled,
which makes quitting and coming back continue where they stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from rlhflab.preferences.store import Pair, PreferenceStore

ACTIONS = {"a": "a", "b": "b", "t": "tie", "s": "skip", "u": "undo", "q": "quit"}
HINT = "press a (A is better), b (B is better), t (tie), s (skip), u (undo last) or q (quit)"
PROMPT = "[a/b/t/s/u/q] > "
SIDE_BY_SIDE_MIN_WIDTH = 70  # below this each answer column would be too narrow to read


@dataclass(frozen=True)
class SessionResult:
    """How a session ended ("done", "quit" or "eof") and what it changed."""

    saved: int
    undone: int
    pending: int
    reason: str


def run_session(store: PreferenceStore, labeler: str, keys: TextIO, console: Console) -> SessionResult:
    """Label this labeler's pending pairs, one key per pair, until none is left, `q`, or end of input."""
    saved = undone = 0
    while pending := store.pending_pairs(labeler, limit=1):
        pair = pending[0]
        console.print(render_pair(pair, store.count_labeled(labeler) + 1, store.count_pairs(), console.width))
        action = read_action(keys, console)
        if action in ("eof", "quit"):
            return _finish(store, labeler, console, saved, undone, action)
        if action == "undo":
            undone += _undo(store, labeler, console)
            continue
        store.record_label(pair.id, labeler, action)
        # Printed only after the commit returned: this line is the acknowledgement scripts can rely on.
        _say(console, f"saved: pair {pair.id} = {action}")
        saved += 1
    return _finish(store, labeler, console, saved, undone, "done")


def render_pair(pair: Pair, position: int, total: int, width: int) -> RenderableType:
    """Progress line, the prompt, then answers A and B side by side (stacked on a narrow terminal)."""
    # Text(), not markup strings: model output may contain [brackets] that rich would try to parse.
    prompt = Panel(Text(pair.prompt.text), title="prompt", title_align="left")
    a = Panel(Text(pair.a.text), title="A", border_style="cyan")
    b = Panel(Text(pair.b.text), title="B", border_style="magenta")
    if width >= SIDE_BY_SIDE_MIN_WIDTH:
        answers = Table.grid(expand=True, padding=(0, 1))
        answers.add_column(ratio=1)
        answers.add_column(ratio=1)
        answers.add_row(a, b)
    else:
        answers = Group(a, b)
    progress = Text(f"pair {position} of {total}", style="bold")
    return Group(Text(""), progress, prompt, answers)


def read_action(keys: TextIO, console: Console) -> str:
    """Read lines until one starts with a known key; returns its action, or "eof" at end of input."""
    while True:
        console.print(Text(PROMPT), end="")
        console.file.flush()
        try:
            line = keys.readline()
        except KeyboardInterrupt:
            console.print()
            return "quit"
        if line == "":
            console.print()
            return "eof"
        if not keys.isatty():
            # Piped keys are not echoed by a terminal; echoing keeps the transcript readable.
            console.print(Text(line.rstrip("\n")))
        action = ACTIONS.get(line.strip()[:1].lower())
        if action is not None:
            return action
        console.print(Text(HINT, style="yellow"))


def _undo(store: PreferenceStore, labeler: str, console: Console) -> int:
    comparison = store.undo_last(labeler)
    if comparison is None:
        _say(console, "nothing to undo")
        return 0
    _say(console, f"undone: pair {comparison.pair_id} = {comparison.choice}")
    return 1


def _finish(
    store: PreferenceStore, labeler: str, console: Console, saved: int, undone: int, reason: str
) -> SessionResult:
    pending = store.count_pairs() - store.count_labeled(labeler)
    how = {"done": "all pairs labeled", "quit": "quit", "eof": "end of input"}[reason]
    _say(console, f"{how}: {saved} labels saved, {undone} undone, {pending} pending for {labeler}")
    return SessionResult(saved, undone, pending, reason)


def _say(console: Console, message: str) -> None:
    console.print(Text(message))
    console.file.flush()  # a script reading our stdout through a pipe must see it now
