"""Durable preference store: prompts, responses, A/B pairs and the comparisons labelers made.

One SQLite file at a path the user picks, opened in WAL mode with `synchronous=FULL` (a commit is on disk
before it returns, so a label acknowledged to the user survives a crash or SIGKILL) and a 5 s busy timeout
(a labeler and a judge can write to the same file at once).

Identity is by content: prompts, responses and pairs carry a SHA-256 key of what they contain, so adding
the same thing twice stores it once. A pair is the same pair whichever answer is called "a": its key uses
the two response keys in sorted order. A labeler has at most one comparison per pair; re-submitting the
same choice is a no-op, a different choice is refused (undo first, never a silent overwrite).

All SQL of the preference store lives in this module.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rlhflab.errors import UserError

SCHEMA_VERSION = 1
CHOICES = ("a", "b", "tie", "skip")

_SCHEMA = (
    """CREATE TABLE prompts (
        id         INTEGER PRIMARY KEY,
        key        TEXT NOT NULL UNIQUE,          -- sha256 of the content
        text       TEXT NOT NULL,                 -- what labelers, judges and reward models read
        messages   TEXT,                          -- JSON list of chat messages, NULL for a plain-text prompt
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE responses (
        id         INTEGER PRIMARY KEY,
        key        TEXT NOT NULL UNIQUE,
        prompt_id  INTEGER NOT NULL REFERENCES prompts(id),
        text       TEXT NOT NULL,
        model      TEXT,                          -- model or checkpoint that produced it, NULL if unknown
        sampling   TEXT NOT NULL,                 -- JSON object of sampling settings, {} if unknown
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE pairs (
        id          INTEGER PRIMARY KEY,
        key         TEXT NOT NULL UNIQUE,
        prompt_id   INTEGER NOT NULL REFERENCES prompts(id),
        response_a  INTEGER NOT NULL REFERENCES responses(id),
        response_b  INTEGER NOT NULL REFERENCES responses(id),
        source      TEXT NOT NULL,                -- e.g. "import:prefs.jsonl" or "generate"
        created_at  TEXT NOT NULL
    )""",
    """CREATE TABLE comparisons (
        id         INTEGER PRIMARY KEY,
        pair_id    INTEGER NOT NULL REFERENCES pairs(id),
        labeler    TEXT NOT NULL,
        choice     TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'skip')),
        created_at TEXT NOT NULL,
        note       TEXT,
        UNIQUE (pair_id, labeler)
    )""",
    "CREATE INDEX comparisons_by_labeler ON comparisons (labeler, id)",
)

_PAIR_COLUMNS = """
    p.id, p.source, p.created_at,
    q.id, q.text, q.messages,
    ra.id, ra.text, ra.model, ra.sampling,
    rb.id, rb.text, rb.model, rb.sampling
"""
_PAIR_JOINS = """
    FROM pairs p
    JOIN prompts q    ON q.id = p.prompt_id
    JOIN responses ra ON ra.id = p.response_a
    JOIN responses rb ON rb.id = p.response_b
"""
_SQL = {
    "insert_prompt": "INSERT INTO prompts (key, text, messages, created_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (key) DO NOTHING",
    "prompt_id": "SELECT id FROM prompts WHERE key = ?",
    "insert_response": "INSERT INTO responses (key, prompt_id, text, model, sampling, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
    "response_id": "SELECT id FROM responses WHERE key = ?",
    "insert_pair": "INSERT INTO pairs (key, prompt_id, response_a, response_b, source, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
    "pair_by_key": "SELECT id, response_a FROM pairs WHERE key = ?",
    "pair_exists": "SELECT 1 FROM pairs WHERE id = ?",
    "pair": f"SELECT {_PAIR_COLUMNS} {_PAIR_JOINS} WHERE p.id = ?",
    "pending": f"SELECT {_PAIR_COLUMNS} {_PAIR_JOINS} "
    "WHERE NOT EXISTS (SELECT 1 FROM comparisons c WHERE c.pair_id = p.id AND c.labeler = ?) "
    "ORDER BY p.id LIMIT ?",
    "all_pairs": f"SELECT {_PAIR_COLUMNS} {_PAIR_JOINS} ORDER BY p.id",
    "count_pairs": "SELECT COUNT(*) FROM pairs",
    "count_labeled_by": "SELECT COUNT(*) FROM comparisons WHERE labeler = ?",
    "count_by_labeler": "SELECT labeler, COUNT(*) FROM comparisons GROUP BY labeler ORDER BY labeler",
    "insert_comparison": "INSERT INTO comparisons (pair_id, labeler, choice, created_at, note) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (pair_id, labeler) DO NOTHING",
    "comparison_of": "SELECT id, pair_id, labeler, choice, created_at, note FROM comparisons "
    "WHERE pair_id = ? AND labeler = ?",
    "last_comparison_of": "SELECT id, pair_id, labeler, choice, created_at, note FROM comparisons "
    "WHERE labeler = ? ORDER BY id DESC LIMIT 1",
    "delete_comparison": "DELETE FROM comparisons WHERE id = ?",
    "comparisons": "SELECT id, pair_id, labeler, choice, created_at, note FROM comparisons "
    "WHERE (:pair_id IS NULL OR pair_id = :pair_id) AND (:labeler IS NULL OR labeler = :labeler) "
    "ORDER BY id",
    "table_names": "SELECT name FROM sqlite_master WHERE type = 'table'",
}


@dataclass(frozen=True)
class Candidate:
    """A response to store: its text and, when known, what produced it."""

    text: str
    model: str | None = None
    sampling: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NewPair:
    """A pair to add, optionally with a label already attached (e.g. an imported preference).

    `messages` is the chat form of the prompt (list of {"role", "content"}), None for plain text.
    `choice` ("a", "b", "tie", "skip") is recorded for `labeler` ("import" when not given).
    """

    prompt: str
    a: Candidate
    b: Candidate
    source: str
    messages: list[dict] | None = None
    choice: str | None = None
    labeler: str | None = None


@dataclass(frozen=True)
class Prompt:
    """A stored prompt: plain text, plus its chat messages when it came as a conversation."""

    id: int
    text: str
    messages: list[dict] | None


@dataclass(frozen=True)
class Response:
    """A stored answer and what produced it (model/checkpoint, sampling settings)."""

    id: int
    text: str
    model: str | None
    sampling: dict


@dataclass(frozen=True)
class Pair:
    """Two answers to one prompt, to be compared; `source` says where the pair came from."""

    id: int
    prompt: Prompt
    a: Response
    b: Response
    source: str
    created_at: str


@dataclass(frozen=True)
class Comparison:
    """One labeler's choice on one pair: "a", "b", "tie" or "skip"."""

    id: int
    pair_id: int
    labeler: str
    choice: str
    created_at: str
    note: str | None


@dataclass(frozen=True)
class Verdict:
    """What the labelers of one pair decided together.

    `choice` is "a" or "b" (a preference), "tie", "skip" (only skips), "pending" (no label yet) or
    "contested" (the top choices have equal votes). Rule: skips are ignored; among a/b/tie votes the
    choice with strictly the most votes wins; equal top counts are "contested".
    """

    pair: Pair
    choice: str
    votes: dict[str, int]


@dataclass(frozen=True)
class AddCounts:
    """What `add_pairs` did: pairs newly stored, pairs already there, labels newly stored."""

    new_pairs: int = 0
    existing_pairs: int = 0
    new_labels: int = 0


@dataclass(frozen=True)
class LabelerAgreement:
    """Agreement of two labelers on the pairs both labeled (skips left out)."""

    labelers: tuple[str, str]
    shared: int
    agree: float
    kappa: float | None  # Cohen's kappa over a/b/tie; None when chance agreement is 1 (undefined)


@dataclass(frozen=True)
class Stats:
    """Counts by state and by labeler, and agreement between labelers."""

    pairs: int
    by_state: dict[str, int]  # verdict choice -> number of pairs
    by_labeler: dict[str, dict[str, int]]  # labeler -> choice -> number of comparisons
    shared_pairs: int  # pairs with >= 2 non-skip labels
    identical: int  # ... of which every label is the same choice
    pairwise: list[LabelerAgreement]

    @property
    def agreement(self) -> float | None:
        """Share of shared pairs on which all labelers made the identical choice."""
        return self.identical / self.shared_pairs if self.shared_pairs else None


def _digest(*parts) -> str:
    """Content key: SHA-256 of the parts as canonical JSON (stable across runs and machines)."""
    blob = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _check_choice(choice: str) -> None:
    if choice not in CHOICES:
        raise UserError(f"invalid choice {choice!r}: expected one of {', '.join(CHOICES)}")


class PreferenceStore:
    """The preference DB at `path`. Use as a context manager or call `close()`.

    `create=False` refuses a path with no DB yet (commands that only read or label need one to exist).
    """

    def __init__(self, path: str | Path, *, create: bool = True):
        self.path = Path(path)
        self._check_path(create)
        # isolation_level=None: transactions are explicit (see `_transaction`), never opened behind our back.
        self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        try:
            self._configure()
            self._ensure_schema()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise UserError(f"{self.path} is not a usable SQLite preference DB ({e})") from None
        except UserError:
            self._db.close()
            raise

    # -- connection -----------------------------------------------------------------------------------

    def _check_path(self, create: bool) -> None:
        if self.path.is_dir():
            raise UserError(f"{self.path} is a directory; --db wants a file path such as prefs.db")
        if not self.path.parent.is_dir():
            raise UserError(f"cannot open {self.path}: directory {self.path.parent} does not exist")
        if not create and not self.path.exists():
            raise UserError(f"no preference DB at {self.path}; create one with `prefs import` or `prefs generate`")

    def _configure(self) -> None:
        self._db.execute("PRAGMA busy_timeout = 5000")
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise UserError(f"{self.path}: could not switch to WAL journal mode (got {mode})")
        # FULL: in WAL mode a commit is fsynced before COMMIT returns, so an acknowledged label is durable.
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")

    def _ensure_schema(self) -> None:
        if self._schema_version() == SCHEMA_VERSION:
            return
        with self._transaction():
            # Checked again under the write lock: another process may have just created the schema.
            version = self._schema_version()
            if version == SCHEMA_VERSION:
                return
            if version > SCHEMA_VERSION:
                raise UserError(f"{self.path} has preference schema v{version}; this rlhflab reads v{SCHEMA_VERSION}")
            if self._db.execute(_SQL["table_names"]).fetchall():
                raise UserError(f"{self.path} is a SQLite DB but not an rlhflab preference store")
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front so two writers queue, not deadlock."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PreferenceStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writes ---------------------------------------------------------------------------------------

    def add_pair(self, pair: NewPair) -> int:
        """Store one pair (and its label, if any) in its own transaction; returns the pair id."""
        with self._transaction():
            pair_id, _, _ = self._insert_pair(pair)
        return pair_id

    def add_pairs(self, pairs: Iterable[NewPair]) -> AddCounts:
        """Store many pairs in one transaction: a failure part-way leaves the DB as it was."""
        new_pairs = existing = new_labels = 0
        with self._transaction():
            for pair in pairs:
                _, is_new, labeled = self._insert_pair(pair)
                new_pairs += is_new
                existing += not is_new
                new_labels += labeled
        return AddCounts(new_pairs, existing, new_labels)

    def add_generated_pair(
        self,
        prompt: str,
        completion_a: str,
        completion_b: str,
        *,
        model: str,
        sampling: dict,
        messages: list[dict] | None = None,
    ) -> int | None:
        """Hook for `prefs generate`: two sampled answers to one prompt, stored as a pending pair.

        Returns the pair id, or None when both samples are the same text (comparing them teaches nothing).
        """
        if completion_a == completion_b:
            return None
        pair = NewPair(
            prompt=prompt,
            a=Candidate(completion_a, model, sampling),
            b=Candidate(completion_b, model, sampling),
            source="generate",
            messages=messages,
        )
        return self.add_pair(pair)

    def _insert_pair(self, pair: NewPair) -> tuple[int, bool, bool]:
        """Insert prompt, responses, pair and label inside the caller's transaction.

        Returns (pair id, whether the pair is new, whether a new label was stored).
        """
        if pair.a.text == pair.b.text:
            raise UserError(f"pair from {pair.source}: both answers are the same text")
        messages = json.dumps(pair.messages, ensure_ascii=False) if pair.messages is not None else None
        prompt_key = _digest("prompt", pair.prompt, pair.messages)
        prompt_id = self._upsert("insert_prompt", "prompt_id", prompt_key, (pair.prompt, messages, _now()))
        keys, ids = [], []
        for cand in (pair.a, pair.b):
            key = _digest("response", prompt_key, cand.text, cand.model, cand.sampling)
            row = (prompt_id, cand.text, cand.model, json.dumps(cand.sampling, sort_keys=True), _now())
            keys.append(key)
            ids.append(self._upsert("insert_response", "response_id", key, row))
        pair_key = _digest("pair", prompt_key, sorted(keys))
        inserted = self._db.execute(
            _SQL["insert_pair"], (pair_key, prompt_id, ids[0], ids[1], pair.source, _now())
        ).rowcount
        pair_id, stored_a = self._db.execute(_SQL["pair_by_key"], (pair_key,)).fetchone()
        labeled = False
        if pair.choice is not None:
            # The stored pair may have the answers the other way round (added earlier in the other order).
            choice = _flip(pair.choice) if stored_a != ids[0] else pair.choice
            labeled = self._insert_label(pair_id, pair.labeler or "import", choice, None)[1]
        return pair_id, bool(inserted), labeled

    def _upsert(self, insert: str, select: str, key: str, values: tuple) -> int:
        self._db.execute(_SQL[insert], (key, *values))
        return self._db.execute(_SQL[select], (key,)).fetchone()[0]

    def record_label(self, pair_id: int, labeler: str, choice: str, note: str | None = None) -> Comparison:
        """Store a comparison; it is durable when this returns (acknowledge the label only then).

        Idempotent: the same (pair, labeler, choice) again returns the stored comparison. A different
        choice for a pair this labeler already labeled is refused: `undo_last` first.
        """
        with self._transaction():
            comparison, _ = self._insert_label(pair_id, labeler, choice, note)
        return comparison

    def record_labels(self, labels: Iterable[tuple[int, str, str, str | None]]) -> int:
        """Store many (pair id, labeler, choice, note) comparisons in one transaction; returns how many were new."""
        with self._transaction():
            return sum(self._insert_label(*label)[1] for label in labels)

    def _insert_label(self, pair_id: int, labeler: str, choice: str, note: str | None) -> tuple[Comparison, bool]:
        _check_choice(choice)
        if not labeler:
            raise UserError("a labeler name must not be empty")
        if self._db.execute(_SQL["pair_exists"], (pair_id,)).fetchone() is None:
            raise UserError(f"no pair with id {pair_id} in {self.path}")
        inserted = self._db.execute(_SQL["insert_comparison"], (pair_id, labeler, choice, _now(), note)).rowcount
        stored = Comparison(*self._db.execute(_SQL["comparison_of"], (pair_id, labeler)).fetchone())
        if stored.choice != choice:
            raise UserError(
                f"{labeler} already labeled pair {pair_id} as {stored.choice!r}; undo that label before "
                f"choosing {choice!r}"
            )
        return stored, bool(inserted)

    def undo_last(self, labeler: str) -> Comparison | None:
        """Delete this labeler's most recent comparison; returns it, or None when there is none."""
        with self._transaction():
            row = self._db.execute(_SQL["last_comparison_of"], (labeler,)).fetchone()
            if row is None:
                return None
            self._db.execute(_SQL["delete_comparison"], (row[0],))
        return Comparison(*row)

    # -- reads ----------------------------------------------------------------------------------------

    def pair(self, pair_id: int) -> Pair:
        row = self._db.execute(_SQL["pair"], (pair_id,)).fetchone()
        if row is None:
            raise UserError(f"no pair with id {pair_id} in {self.path}")
        return _pair_from_row(row)

    def pairs(self) -> list[Pair]:
        """All pairs, oldest first."""
        return [_pair_from_row(r) for r in self._db.execute(_SQL["all_pairs"])]

    def pending_pairs(self, labeler: str, limit: int | None = None) -> list[Pair]:
        """Pairs this labeler has not labeled yet (skips count as labeled), oldest first."""
        rows = self._db.execute(_SQL["pending"], (labeler, -1 if limit is None else limit))
        return [_pair_from_row(r) for r in rows]

    def count_pairs(self) -> int:
        return self._db.execute(_SQL["count_pairs"]).fetchone()[0]

    def count_labeled(self, labeler: str) -> int:
        """Pairs this labeler has a comparison for (skips included)."""
        return self._db.execute(_SQL["count_labeled_by"], (labeler,)).fetchone()[0]

    def count_labeled_by_labeler(self) -> dict[str, int]:
        """Comparisons per labeler (skips included), by name; one query, cheap enough to run per request."""
        return dict(self._db.execute(_SQL["count_by_labeler"]).fetchall())

    def comparisons(self, *, pair_id: int | None = None, labeler: str | None = None) -> list[Comparison]:
        """Comparisons in the order they were made, optionally for one pair and/or one labeler."""
        rows = self._db.execute(_SQL["comparisons"], {"pair_id": pair_id, "labeler": labeler})
        return [Comparison(*r) for r in rows]

    def verdicts(self) -> list[Verdict]:
        """Every pair with what its labelers decided together (see `Verdict` for the majority rule)."""
        by_pair: dict[int, list[str]] = {}
        for c in self.comparisons():
            by_pair.setdefault(c.pair_id, []).append(c.choice)
        return [_verdict(p, by_pair.get(p.id, [])) for p in self.pairs()]

    def stats(self) -> Stats:
        """Counts by state and labeler; agreement on pairs labeled (not skipped) by two or more labelers."""
        verdicts = self.verdicts()
        comparisons = self.comparisons()
        by_labeler: dict[str, Counter] = {}
        decided: dict[int, dict[str, str]] = {}  # pair id -> labeler -> a/b/tie
        for c in comparisons:
            by_labeler.setdefault(c.labeler, Counter())[c.choice] += 1
            if c.choice != "skip":
                decided.setdefault(c.pair_id, {})[c.labeler] = c.choice
        shared = [choices for choices in decided.values() if len(choices) >= 2]
        identical = sum(len(set(choices.values())) == 1 for choices in shared)
        return Stats(
            pairs=len(verdicts),
            by_state=dict(Counter(v.choice for v in verdicts)),
            by_labeler={name: dict(counts) for name, counts in sorted(by_labeler.items())},
            shared_pairs=len(shared),
            identical=identical,
            pairwise=_pairwise_agreement(decided),
        )


def _flip(choice: str) -> str:
    return {"a": "b", "b": "a"}.get(choice, choice)


def _pair_from_row(row: tuple) -> Pair:
    (pid, source, created, qid, qtext, qmsgs, aid, atext, amodel, asamp, bid, btext, bmodel, bsamp) = row
    prompt = Prompt(qid, qtext, json.loads(qmsgs) if qmsgs is not None else None)
    a = Response(aid, atext, amodel, json.loads(asamp))
    b = Response(bid, btext, bmodel, json.loads(bsamp))
    return Pair(pid, prompt, a, b, source, created)


def _verdict(pair: Pair, choices: list[str]) -> Verdict:
    votes = Counter(c for c in choices if c != "skip")
    if not votes:
        return Verdict(pair, "skip" if choices else "pending", {})
    (top, n), *rest = votes.most_common()
    choice = "contested" if rest and rest[0][1] == n else top
    return Verdict(pair, choice, dict(votes))


def _pairwise_agreement(decided: dict[int, dict[str, str]]) -> list[LabelerAgreement]:
    """Per two labelers: share of shared pairs with the same choice, and Cohen's kappa over a/b/tie."""
    labelers = sorted({name for choices in decided.values() for name in choices})
    result = []
    for first, second in itertools.combinations(labelers, 2):
        both = [(c[first], c[second]) for c in decided.values() if first in c and second in c]
        if both:
            result.append(LabelerAgreement((first, second), len(both), *_agreement_and_kappa(both)))
    return result


def _agreement_and_kappa(both: list[tuple[str, str]]) -> tuple[float, float | None]:
    n = len(both)
    observed = sum(x == y for x, y in both) / n
    first, second = Counter(x for x, _ in both), Counter(y for _, y in both)
    # Chance agreement: both labelers pick the same category independently at their own rates.
    expected = sum(first[c] * second[c] for c in ("a", "b", "tie")) / n**2
    kappa = None if expected == 1 else (observed - expected) / (1 - expected)
    return observed, kappa
