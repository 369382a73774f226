"""Durable labels: several labelers on one store, each labeler process killed with -9 at random moments (and once
between the commit and the "saved" line) and restarted until every pair is labeled. No label a labeler saw
acknowledged is lost, none is recorded twice, and every labeler ends with every pair labeled exactly once.

The fast version starts labelers as `python -c` processes running the terminal labeler's own session loop (the
code behind `rlhflab prefs label`, without the CLI's import time); the slow one runs the real command with 4
labelers and 1000 labels."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from rlhflab.preferences.store import Candidate, NewPair, PreferenceStore

REPO = Path(__file__).resolve().parent.parent
ACK = re.compile(r"saved: pair (\d+) = (\w+)")
CHOICES = ["a", "b", "t", "s"]
STORED = {"a": "a", "b": "b", "t": "tie", "s": "skip"}

# The labeler's session loop; with a number N it dies (exit 9, no cleanup) at its N+1-th acknowledgement: after
# the label is committed, before "saved" is printed.
SESSION = """
import os, sys
from rich.console import Console
from rlhflab.preferences import label
from rlhflab.preferences.store import PreferenceStore
db, labeler, die_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
say, acks = label._say, [0]
def dying_say(console, message):
    if message.startswith("saved:"):
        if acks[0] == die_at:
            os._exit(9)
        acks[0] += 1
    say(console, message)
label._say = dying_say
with PreferenceStore(db, create=False) as store:
    label.run_session(store, labeler, sys.stdin, Console(file=sys.stdout, width=200))
"""


def session_command(db: Path, labeler: str, die_at: int) -> list[str]:
    return [sys.executable, "-c", SESSION, str(db), labeler, str(die_at)]


def cli_command(db: Path, labeler: str, die_at: int) -> list[str]:
    assert die_at < 0, "the real command has no kill-after-commit switch; the fast test covers that case"
    return [sys.executable, "-m", "rlhflab", "prefs", "label", "--db", str(db), "--labeler", labeler]


def make_store(db: Path, n: int) -> None:
    with PreferenceStore(db) as store:
        store.add_pairs(NewPair(f"prompt {i}?", Candidate(f"answer A{i}"), Candidate(f"answer B{i}"), "test")
                        for i in range(n))


def label_until_done(db: Path, labeler: str, n_pairs: int, kills: int, command, seed: int) -> dict:
    """One labeler: start, press random keys, kill -9 after a random number of acknowledgements (`kills`
    times, the first of them between a commit and its acknowledgement), restart, until all pairs are done.
    -> {"acked": {pair: choice}, "kills": how many processes were killed}"""
    rng = random.Random(seed)
    acked: dict[int, str] = {}
    killed = 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    while True:
        left = n_pairs - len(acked)
        kill_after = rng.randint(1, max(1, left // (kills - killed + 1))) if killed < kills else None
        die_at = kill_after if killed == 0 and kill_after is not None and command is session_command else -1
        proc = subprocess.Popen(command(db, labeler, die_at), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO)
        keys = [rng.choice(CHOICES) for _ in range(left + 5)]
        proc.stdin.write("".join(k + "\n" for k in keys))
        proc.stdin.close()
        seen = 0
        for line in proc.stdout:
            if m := ACK.search(line):
                pair, choice = int(m.group(1)), m.group(2)
                assert pair not in acked, f"{labeler}: pair {pair} was shown again after it was saved"
                acked[pair] = choice
                seen += 1
                if kill_after is not None and die_at < 0 and seen >= kill_after:
                    proc.kill()  # SIGKILL: no cleanup, no flush
                    break
        proc.wait()
        proc.stdout.close()
        if kill_after is not None:
            assert proc.returncode in (-9, 9), f"{labeler}: expected a killed process, got {proc.returncode}"
            killed += 1
            continue
        assert proc.returncode == 0
        with PreferenceStore(db, create=False) as store:
            if store.count_labeled(labeler) == n_pairs:
                return {"acked": acked, "kills": killed}


def check_store(db: Path, results: dict[str, dict], n_pairs: int) -> tuple[int, int]:
    """-> (labels acknowledged, labels committed without an acknowledgement)"""
    acknowledged = unacknowledged = 0
    with PreferenceStore(db, create=False) as store:
        for labeler, result in results.items():
            rows = store.comparisons(labeler=labeler)
            stored = {c.pair_id: c.choice for c in rows}
            assert len(rows) == len(stored) == n_pairs  # every pair once, none twice
            for pair, choice in result["acked"].items():
                assert stored[pair] == choice, f"{labeler}: acknowledged label of pair {pair} lost or changed"
            acknowledged += len(result["acked"])
            unacknowledged += n_pairs - len(result["acked"])
    return acknowledged, unacknowledged


def run_labelers(tmp_path: Path, labelers: int, n_pairs: int, kills: int, command) -> tuple[int, int, int]:
    db = tmp_path / "prefs.db"
    make_store(db, n_pairs)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def one(index: int) -> None:
        name = f"labeler{index}"
        try:
            results[name] = label_until_done(db, name, n_pairs, kills, command, seed=index)
        except BaseException as err:  # noqa: BLE001 — re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(labelers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    acknowledged, unacknowledged = check_store(db, results, n_pairs)
    return acknowledged, unacknowledged, sum(r["kills"] for r in results.values())


def test_concurrent_labelers_killed_with_minus_9_lose_nothing(tmp_path):
    acknowledged, unacknowledged, kills = run_labelers(tmp_path, labelers=3, n_pairs=40, kills=3,
                                                       command=session_command)
    assert kills == 9
    assert unacknowledged >= 3  # each labeler's first process died after a commit, before its "saved" line
    assert acknowledged + unacknowledged == 3 * 40


@pytest.mark.slow
def test_four_labelers_1000_labels_through_the_real_command(tmp_path, capsys):
    acknowledged, unacknowledged, kills = run_labelers(tmp_path, labelers=4, n_pairs=250, kills=3,
                                                       command=cli_command)
    assert acknowledged + unacknowledged == 1000 and kills == 12
    with capsys.disabled():
        print(f"\n1000 labels by 4 labelers, {kills} kill -9: 0 lost, 0 duplicated "
              f"({unacknowledged} committed just before a kill, never acknowledged, kept)")
