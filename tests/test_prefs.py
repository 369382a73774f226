"""Preference store, import/export, terminal labeling, judge and the `prefs` CLI."""

from __future__ import annotations

import io
import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from rlhflab.cli.prefs import prefs_app
from rlhflab.errors import UserError
from rlhflab.preferences.io import export_jsonl, export_rows, import_jsonl
from rlhflab.preferences.judge import judge_pending
from rlhflab.preferences.label import run_session
from rlhflab.preferences.store import Candidate, NewPair, PreferenceStore

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def unlabeled(n: int) -> list[NewPair]:
    return [NewPair(f"prompt {i}", Candidate(f"answer {i}a"), Candidate(f"answer {i}b"), "test") for i in range(n)]


def store_with(tmp_path: Path, n: int) -> PreferenceStore:
    store = PreferenceStore(tmp_path / "prefs.db")
    store.add_pairs(unlabeled(n))
    return store


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def label(store: PreferenceStore, labeler: str, keys: str):
    """Run a labeling session on piped `keys`; returns (result, transcript)."""
    out = io.StringIO()
    result = run_session(store, labeler, io.StringIO(keys), Console(file=out, width=100))
    return result, out.getvalue()


def choices(store: PreferenceStore, labeler: str) -> dict[int, str]:
    return {c.pair_id: c.choice for c in store.comparisons(labeler=labeler)}


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


# -- store --------------------------------------------------------------------------------------------


def test_every_record_round_trips_through_a_reopened_store(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    sampling = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 32}
    new = NewPair("Hi?", Candidate("Hello!", "ckpt-3", sampling), Candidate("Hey.", "ref", {}), "test", messages)
    with PreferenceStore(tmp_path / "p.db") as store:
        pair_id = store.add_pair(new)
        store.record_label(pair_id, "ana", "b", note="shorter")
    with PreferenceStore(tmp_path / "p.db", create=False) as store:
        pair = store.pair(pair_id)
        [comparison] = store.comparisons()
    assert (pair.prompt.text, pair.prompt.messages, pair.source) == ("Hi?", messages, "test")
    assert (pair.a.text, pair.a.model, pair.a.sampling) == ("Hello!", "ckpt-3", sampling)
    assert (pair.b.text, pair.b.model, pair.b.sampling) == ("Hey.", "ref", {})
    assert (comparison.pair_id, comparison.labeler, comparison.choice) == (pair_id, "ana", "b")
    assert comparison.note == "shorter"
    assert comparison.created_at.endswith("+00:00")


def test_store_uses_wal_and_full_sync(tmp_path):
    with PreferenceStore(tmp_path / "p.db") as store:
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000


def test_same_label_twice_is_stored_once_and_a_changed_mind_needs_undo(tmp_path):
    with store_with(tmp_path, 2) as store:
        first = store.record_label(1, "ana", "a")
        assert store.record_label(1, "ana", "a") == first
        assert len(store.comparisons()) == 1
        with pytest.raises(UserError, match="undo"):
            store.record_label(1, "ana", "b")
        assert store.undo_last("ana") == first
        store.record_label(1, "ana", "b")
        assert choices(store, "ana") == {1: "b"}
        assert store.undo_last("nobody") is None


def test_pending_pairs_are_per_labeler_in_stable_order(tmp_path):
    with store_with(tmp_path, 4) as store:
        store.record_label(2, "ana", "skip")
        store.record_label(1, "bo", "a")
        assert [p.id for p in store.pending_pairs("ana")] == [1, 3, 4]
        assert [p.id for p in store.pending_pairs("bo", limit=2)] == [2, 3]


def test_add_generated_pair_is_pending_and_keeps_its_provenance(tmp_path):
    with PreferenceStore(tmp_path / "p.db") as store:
        pair_id = store.add_generated_pair("Once", "upon", "a time", model="runs/r1/step-40", sampling={"top_k": 5})
        assert store.add_generated_pair("Once", "same", "same", model="m", sampling={}) is None
        [pair] = store.pending_pairs("ana")
    assert (pair.id, pair.source) == (pair_id, "generate")
    assert (pair.a.model, pair.b.sampling) == ("runs/r1/step-40", {"top_k": 5})


def make_directory(path: Path) -> None:
    path.mkdir()


def make_text_file(path: Path) -> None:
    path.write_text("not a database at all, just text")


def make_foreign_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()


@pytest.mark.parametrize(
    "setup, create, message",
    [
        (None, True, "does not exist"),
        (make_directory, True, "is a directory"),
        (make_text_file, True, "not a usable SQLite"),
        (make_foreign_sqlite, True, "not an rlhflab"),
        (lambda path: None, False, "no preference DB"),
    ],
    ids=["missing-dir", "directory", "not-sqlite", "foreign-sqlite", "missing-file"],
)
def test_bad_store_paths_are_user_errors(tmp_path, setup, create, message):
    path = tmp_path / "dir" / "p.db"
    if setup is not None:
        path.parent.mkdir()
        setup(path)
    with pytest.raises(UserError, match=message):
        PreferenceStore(path, create=create)


# -- import / export ----------------------------------------------------------------------------------


def test_trl_text_import_export_round_trip_with_uninformative_positions(tmp_path):
    records = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    with PreferenceStore(tmp_path / "p.db") as store:
        counts = import_jsonl(store, write_jsonl(tmp_path / "in.jsonl", records))
        assert (counts.new_pairs, counts.new_labels) == (40, 40)
        sides = {c.choice for c in store.comparisons(labeler="import")}
        exported = export_jsonl(store, tmp_path / "out.jsonl")
    assert sides == {"a", "b"}  # the chosen answer is not always in the same position
    assert read_jsonl(tmp_path / "out.jsonl") == records
    assert exported.exported == 40 and sum(exported.left_out.values()) == 0


def test_conversational_import_export_round_trip(tmp_path):
    records = [
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Review {i}?"}],
            "chosen": [{"role": "assistant", "content": f"Lovely film {i}."}],
            "rejected": [{"role": "assistant", "content": f"Dull film {i}."}],
        }
        for i in range(3)
    ]
    with PreferenceStore(tmp_path / "p.db") as store:
        import_jsonl(store, write_jsonl(tmp_path / "in.jsonl", records))
        assert store.pair(1).prompt.text == "system: Be kind.\n\nuser: Review 0?"
        export_jsonl(store, tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl") == records


def test_unlabeled_pairs_import_as_pending_and_export_nothing(tmp_path):
    records = [{"prompt": "p", "completion_a": "x", "completion_b": "y"}]
    with PreferenceStore(tmp_path / "p.db") as store:
        import_jsonl(store, write_jsonl(tmp_path / "in.jsonl", records))
        [pair] = store.pending_pairs("ana")
        rows, counts = export_rows(store)
    assert (pair.a.text, pair.b.text, pair.source) == ("x", "y", "import:in.jsonl")
    assert rows == [] and counts.left_out["pending"] == 1


def test_importing_twice_stores_everything_once(tmp_path):
    records = [
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "completion_a": "x", "completion_b": "y"},
    ]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    with PreferenceStore(tmp_path / "p.db") as store:
        import_jsonl(store, path)
        again = import_jsonl(store, path)
        assert (again.new_pairs, again.existing_pairs, again.new_labels) == (0, 2, 0)
        assert (store.count_pairs(), len(store.comparisons())) == (2, 1)


def test_a_pair_stored_the_other_way_round_is_the_same_pair(tmp_path):
    with PreferenceStore(tmp_path / "p.db") as store:
        unlabeled_pair = {"prompt": "p", "completion_a": "x", "completion_b": "y"}
        import_jsonl(store, write_jsonl(tmp_path / "u.jsonl", [unlabeled_pair]))
        import_jsonl(store, write_jsonl(tmp_path / "l.jsonl", [{"prompt": "p", "chosen": "y", "rejected": "x"}]))
        assert store.count_pairs() == 1
        rows, _ = export_rows(store)
    assert rows == [{"prompt": "p", "chosen": "y", "rejected": "x"}]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "chosen": "x"', "not valid JSON"),
        ('["p", "x", "y"]', "must be a JSON object"),
        ('{"prompt": "p", "chosen": "x"}', "missing key 'rejected'"),
        ('{"prompt": "p", "answer": "x"}', "expected keys prompt, chosen, rejected"),
        ('{"prompt": "p", "chosen": "x", "rejected": "x"}', "same text"),
        ('{"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}', "final message"),
        ('{"prompt": [{"role": "user"}], "completion_a": "x", "completion_b": "y"}', r"prompt\[0\]"),
    ],
)
def test_a_bad_line_names_file_and_line_and_stores_nothing(tmp_path, line, message):
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "ok", "chosen": "x", "rejected": "y"}\n' + line + "\n", encoding="utf-8")
    with PreferenceStore(tmp_path / "p.db") as store:
        with pytest.raises(UserError, match=rf"in\.jsonl:2: .*{message}"):
            import_jsonl(store, path)
        assert store.count_pairs() == 0


# -- labeling -----------------------------------------------------------------------------------------


def test_piped_keys_store_exactly_what_was_chosen_and_undo_removes_the_last(tmp_path):
    with store_with(tmp_path, 6) as store:
        result, transcript = label(store, "ana", "a\nb\nt\ns\nu\nq\n")
        assert choices(store, "ana") == {1: "a", 2: "b", 3: "tie"}
        assert (result.saved, result.undone, result.pending, result.reason) == (4, 1, 3, "quit")
    assert "pair 1 of 6" in transcript and "undone: pair 4 = skip" in transcript


def test_quitting_and_coming_back_continues_at_the_first_pending_pair(tmp_path):
    with store_with(tmp_path, 4) as store:
        label(store, "ana", "a\nq\n")
        result, transcript = label(store, "ana", "b\n")
        assert choices(store, "ana") == {1: "a", 2: "b"}
    assert "pair 2 of 4" in transcript and "prompt 1" in transcript
    assert result.reason == "eof"


def test_invalid_key_reprompts_and_eof_ends_cleanly_from_the_cli(tmp_path):
    with store_with(tmp_path, 2):
        pass
    command = ["label", "--db", str(tmp_path / "prefs.db"), "--labeler", "ana"]
    result = runner.invoke(prefs_app, command, input="x\n\na\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("press a (A is better)") == 2
    assert "end of input: 1 labels saved, 0 undone, 1 pending for ana" in result.stdout


def test_sigkill_loses_no_acknowledged_label_and_duplicates_none(tmp_path):
    with store_with(tmp_path, 8):
        pass
    db = tmp_path / "prefs.db"
    command = [sys.executable, "-m", "rlhflab.cli.prefs", "label", "--db", str(db), "--labeler", "kim"]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=subprocess_env()
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    acknowledged = {}
    try:
        for key in "abtsab":
            proc.stdin.write(key + "\n")
            proc.stdin.flush()
            while not (match := re.match(r"saved: pair (\d+) = (\w+)", lines.get(timeout=30))):
                pass
            acknowledged[int(match[1])] = match[2]
        proc.stdin.write("t\n")  # in flight when killed: may or may not be stored, never twice
        proc.stdin.flush()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with PreferenceStore(db, create=False) as store:
        comparisons = store.comparisons(labeler="kim")
        stored = {c.pair_id: c.choice for c in comparisons}
        first_pending = store.pending_pairs("kim", limit=1)[0].id
    assert acknowledged == {1: "a", 2: "b", 3: "tie", 4: "skip", 5: "a", 6: "b"}
    assert len(comparisons) == len(stored)
    assert {p: stored[p] for p in acknowledged} == acknowledged
    assert set(stored) - set(acknowledged) <= {7}
    assert first_pending == max(stored) + 1


# -- stats and judge ----------------------------------------------------------------------------------


def test_stats_agreement_and_kappa_on_two_labelers(tmp_path):
    with store_with(tmp_path, 5) as store:
        for pair_id, choice in zip(range(1, 5), ["a", "b", "tie", "a"]):
            store.record_label(pair_id, "ana", choice)
        for pair_id, choice in zip(range(1, 5), ["a", "a", "tie", "skip"]):
            store.record_label(pair_id, "bo", choice)
        stats = store.stats()
    assert stats.pairs == 5
    assert stats.by_state == {"a": 2, "contested": 1, "tie": 1, "pending": 1}
    assert stats.by_labeler == {"ana": {"a": 2, "b": 1, "tie": 1}, "bo": {"a": 2, "tie": 1, "skip": 1}}
    assert (stats.shared_pairs, stats.identical) == (3, 2)
    [pairwise] = stats.pairwise
    # observed 2/3; chance (1*2 + 1*0 + 1*1) / 9 = 1/3; kappa = (2/3 - 1/3) / (1 - 1/3) = 0.5
    assert pairwise.labelers == ("ana", "bo") and pairwise.kappa == pytest.approx(0.5)


def test_export_takes_the_majority_and_counts_what_it_leaves_out(tmp_path):
    with store_with(tmp_path, 4) as store:
        store.record_labels([(1, "ana", "b", None), (1, "bo", "b", None), (1, "cy", "a", None)])
        store.record_labels([(2, "ana", "a", None), (2, "bo", "b", None)])
        store.record_label(3, "ana", "skip")
        rows, counts = export_rows(store)
    assert rows == [{"prompt": "prompt 0", "chosen": "answer 0b", "rejected": "answer 0a"}]
    assert counts.left_out == {"tie": 0, "skip": 1, "contested": 1, "pending": 1}


def length_reward(calls: list):
    def reward(prompts, completions, metadata):
        assert len(prompts) == len(completions) == len(metadata)
        calls.append(len(completions))
        return [len(c) for c in completions]

    return reward


def test_judge_labels_pending_pairs_in_batches_with_ties_within_margin(tmp_path):
    answers = [("aaaa", "a"), ("b", "bbbbbb"), ("cc", "ccc"), ("ddd", "dd"), ("e", "eeeeeeee")]
    calls: list[int] = []
    with PreferenceStore(tmp_path / "p.db") as store:
        store.add_pairs(NewPair(f"p{i}", Candidate(a), Candidate(b), "test") for i, (a, b) in enumerate(answers))
        counts = judge_pending(store, length_reward(calls), "judge:length", margin=1.0, batch_size=2)
        assert judge_pending(store, length_reward(calls), "judge:length", margin=1.0) == {"a": 0, "b": 0, "tie": 0}
        assert choices(store, "judge:length") == {1: "a", 2: "b", 3: "tie", 4: "tie", 5: "b"}
        assert store.comparisons(pair_id=1)[0].note == "score_a=4 score_b=1"
    assert counts == {"a": 1, "b": 2, "tie": 2}
    assert calls == [4, 4, 2]


def test_judge_refuses_a_reward_with_the_wrong_number_of_scores(tmp_path):
    with store_with(tmp_path, 2) as store:
        with pytest.raises(UserError, match="returned 1 scores for 4 answers"):
            judge_pending(store, lambda p, c, m: [0.0], "judge:broken")
        assert store.comparisons() == []


def test_judge_command_builds_the_reward_from_its_spec(tmp_path, monkeypatch):
    specs = []
    fake = types.ModuleType("rlhflab.rewards.specs")

    def prefers_b(prompts, completions, metadata):
        return [float(c.endswith("b")) for c in completions]

    fake.build_reward = lambda spec: specs.append(spec) or prefers_b
    monkeypatch.setitem(sys.modules, "rlhflab.rewards.specs", fake)
    with store_with(tmp_path, 2):
        pass
    command = ["judge", "--db", str(tmp_path / "prefs.db"), "--reward", "ends-b", "--margin", "0"]
    result = runner.invoke(prefs_app, command)
    assert result.exit_code == 0, result.output
    assert specs == ["ends-b"] and "judged 2 pairs: 0 a, 2 b, 0 tie" in result.stdout
    with PreferenceStore(tmp_path / "prefs.db") as store:
        assert choices(store, "judge:ends-b") == {1: "b", 2: "b"}


# -- CLI ----------------------------------------------------------------------------------------------


def test_user_errors_are_one_red_line_and_exit_code_2(tmp_path):
    missing = tmp_path / "missing"
    result = runner.invoke(prefs_app, ["stats", "--db", str(missing / "p.db")])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"error: cannot open {missing / 'p.db'}: directory {missing} does not exist"]


def test_stats_command_prints_states_labelers_and_agreement(tmp_path):
    with store_with(tmp_path, 2) as store:
        store.record_labels([(1, "ana", "a", None), (1, "bo", "a", None)])
    result = runner.invoke(prefs_app, ["stats", "--db", str(tmp_path / "prefs.db")])
    assert result.exit_code == 0, result.output
    assert "pairs: 2" in result.stdout and "agreement: 1 of 1 shared pairs identical (100%)" in result.stdout


def test_acceptance_three_imported_pairs_labeled_a_b_t_export_two_rows(tmp_path):
    records = [{"prompt": f"Q{i}", "completion_a": f"A{i}", "completion_b": f"B{i}"} for i in range(3)]
    db, out = str(tmp_path / "prefs.db"), tmp_path / "prefs.jsonl"
    imported = runner.invoke(prefs_app, ["import", str(write_jsonl(tmp_path / "pairs.jsonl", records)), "--db", db])
    assert imported.exit_code == 0, imported.output
    labeled = subprocess.run(
        [sys.executable, "-m", "rlhflab.cli.prefs", "label", "--db", db, "--labeler", "me"],
        input="a\nb\nt\n", capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=60,
    )
    assert labeled.returncode == 0, labeled.stderr
    exported = runner.invoke(prefs_app, ["export", "--db", db, "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    assert read_jsonl(out) == [
        {"prompt": "Q0", "chosen": "A0", "rejected": "B0"},
        {"prompt": "Q1", "chosen": "B1", "rejected": "A1"},
    ]
    assert "wrote 2 preference rows" in exported.stdout and "1 tie" in exported.stdout
