"""Import and export preference pairs as JSONL.

Import accepts, one JSON object per line (blank lines ignored, extra keys ignored):

- TRL's preference format `{"prompt": str, "chosen": str, "rejected": str}`: stored as a labeled pair
  (labeler "import" unless told otherwise). Which answer becomes "a" is decided by a coin seeded with the
  seed and the record's content, so position carries no information and re-importing a file gives the
  same layout.
- TRL's conversational form: `prompt` a list of `{"role", "content"}` messages, `chosen`/`rejected` lists
  of messages. The answer stored is the content of the final message, which must be an assistant message.
  The prompt keeps its messages (lossless, for chat templates) and also gets a plain-text rendering that
  labelers, judges and reward functions read: one `role: content` block per message, blank-line separated.
- Unlabeled pairs `{"prompt", "completion_a", "completion_b"}` (prompt text or messages, completions text
  or messages as above): stored as pending pairs.

A bad line is a `UserError` naming the file, the line and what is wrong; nothing is stored then.

Export writes TRL's format `{"prompt", "chosen", "rejected"}` from every pair whose labelers preferred an
answer. Several labelers on one pair: skips are ignored and the choice (a, b or tie) with strictly the most
votes wins; equal top votes make the pair "contested". Ties, skips, contested and pending pairs are left out
and counted. When every exported prompt came in as messages the file is conversational (prompt as messages,
chosen/rejected as one assistant message each); otherwise every prompt is written as its plain text.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from rlhflab.data.prompts import iter_jsonl
from rlhflab.errors import UserError
from rlhflab.files import write_atomic
from rlhflab.preferences.store import AddCounts, Candidate, NewPair, PreferenceStore, Verdict

LEFT_OUT = ("tie", "skip", "contested", "pending")


@dataclass(frozen=True)
class ExportCounts:
    """Rows written, and pairs left out by state (tie, skip, contested, pending)."""

    exported: int
    left_out: dict[str, int]


def import_jsonl(store: PreferenceStore, path: str | Path, *, labeler: str = "import", seed: int = 0) -> AddCounts:
    """Read `path` and store its pairs (and labels) in one transaction."""
    return store.add_pairs(read_jsonl(path, labeler=labeler, seed=seed))


def read_jsonl(path: str | Path, *, labeler: str = "import", seed: int = 0) -> list[NewPair]:
    """Parse every line of `path` into a `NewPair`; the first bad line raises a `UserError`."""
    path = Path(path)
    pairs = []
    fix = "pass a JSONL of prompt/chosen/rejected or prompt/completion_a/completion_b objects, one per line"
    for number, record in iter_jsonl(path, "preference file", fix):
        try:
            pairs.append(_parse_record(record, f"import:{path.name}", labeler, seed))
        except ValueError as e:
            raise UserError(f"{path}:{number}: {e}") from None
    return pairs


def _parse_record(record: dict, source: str, labeler: str, seed: int) -> NewPair:
    if "chosen" in record or "rejected" in record:
        prompt, messages = _prompt(_field(record, "prompt"))
        chosen, rejected = _answer(record, "chosen"), _answer(record, "rejected")
        if chosen == rejected:
            raise ValueError("chosen and rejected are the same text")
        chosen_is_a = random.Random(f"{seed}:{prompt}:{chosen}:{rejected}").random() < 0.5
        a, b = (chosen, rejected) if chosen_is_a else (rejected, chosen)
        choice = "a" if chosen_is_a else "b"
        return NewPair(prompt, Candidate(a), Candidate(b), source, messages, choice, labeler)
    if "completion_a" in record or "completion_b" in record:
        prompt, messages = _prompt(_field(record, "prompt"))
        a, b = _answer(record, "completion_a"), _answer(record, "completion_b")
        if a == b:
            raise ValueError("completion_a and completion_b are the same text")
        return NewPair(prompt, Candidate(a), Candidate(b), source, messages)
    raise ValueError(
        "expected keys prompt, chosen, rejected (a preference) or prompt, completion_a, completion_b "
        f"(an unlabeled pair); got {', '.join(sorted(record)) or 'no keys'}"
    )


def _field(record: dict, key: str):
    if key not in record:
        raise ValueError(f"missing key {key!r}")
    return record[key]


def _prompt(value) -> tuple[str, list[dict] | None]:
    """A prompt as (plain text, chat messages or None)."""
    if isinstance(value, str):
        return value, None
    messages = _messages(value, "prompt")
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages), messages


def _answer(record: dict, key: str) -> str:
    """An answer's text: the string itself, or the content of a message list's final assistant message."""
    value = _field(record, key)
    if isinstance(value, str):
        return value
    last = _messages(value, key)[-1]
    if last["role"] != "assistant":
        raise ValueError(f"{key}: the final message must be from the assistant, got role {last['role']!r}")
    return last["content"]


def _messages(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key}: expected a string or a non-empty list of messages")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{key}[{i}]: expected a message {{\"role\": str, \"content\": str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def export_rows(store: PreferenceStore) -> tuple[list[dict], ExportCounts]:
    """The TRL rows of every decided pair, and what was written and left out."""
    verdicts = store.verdicts()
    decided = [v for v in verdicts if v.choice in ("a", "b")]
    conversational = bool(decided) and all(v.pair.prompt.messages is not None for v in decided)
    rows = [_row(v, conversational) for v in decided]
    left_out = {state: sum(v.choice == state for v in verdicts) for state in LEFT_OUT}
    return rows, ExportCounts(len(rows), left_out)


def _row(verdict: Verdict, conversational: bool) -> dict:
    pair = verdict.pair
    chosen, rejected = (pair.a, pair.b) if verdict.choice == "a" else (pair.b, pair.a)
    if conversational:
        return {
            "prompt": pair.prompt.messages,
            "chosen": [{"role": "assistant", "content": chosen.text}],
            "rejected": [{"role": "assistant", "content": rejected.text}],
        }
    return {"prompt": pair.prompt.text, "chosen": chosen.text, "rejected": rejected.text}


def export_jsonl(store: PreferenceStore, out: str | Path) -> ExportCounts:
    """Write the TRL rows to `out` atomically (a reader never sees half a file)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: directory {out.parent} does not exist")
    rows, counts = export_rows(store)
    write_atomic(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return counts
