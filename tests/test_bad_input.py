"""Bad input, everywhere: every command given a malformed file or option exits 2 with at most three lines that
name the file, key or line and the fix; no traceback, no warning noise before it.

The table runs in-process through typer's CliRunner (a subprocess costs seconds of imports each), recording
every warning; the cases marked `console` also run as a user runs them, `python -m rlhflab` in a subprocess
with every warning shown (PYTHONWARNINGS=default), which also sees what importing the libraries prints.
Every case fails before a model loads, except the few that name the tiny model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from rlhflab.cli import app

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"
PROMPTS = "What color is the sky?\nName a color.\n"
PAIRS = '{"prompt": "hi", "completion_a": "hello", "completion_b": "hey there"}\n'
RECIPE = ("model:\n  name: tiny\n  prompt_format: chat\ndata:\n  prompts: p.txt\nrollout:\n  prompts_per_iteration: 4\n"
          "  max_new_tokens: 4\nppo:\n  minibatch_size: 4\n")
PROBES = "behavior: contains:red\ngroups:\n  trained: [\"What color is the sky?\"]\n"
REWARD_PY = """
def wrong_count(prompts, completions, metadata):
    return [1.0]

def wrong_type(prompts, completions, metadata):
    return "high"

def raises(prompts, completions, metadata):
    raise KeyError("score")

def one_arg(text):
    return 1.0
"""


@dataclass
class Case:
    id: str
    argv: list[str]  # `{t}` stands for the case's tmp_path
    expect: list[str]  # substrings of the message: the file, key or line, and the fix
    files: dict[str, str | bytes] = field(default_factory=dict)  # written under tmp_path first
    setup: Callable[[Path], None] | None = None  # anything files cannot say (a database, a run directory)
    console: bool = False  # also run in a subprocess, as a user sees it


def _pending_db(t: Path) -> None:
    from rlhflab.preferences.io import import_jsonl
    from rlhflab.preferences.store import PreferenceStore

    (t / "pairs.jsonl").write_text(PAIRS)
    with PreferenceStore(t / "prefs.db") as store:
        import_jsonl(store, t / "pairs.jsonl")


def _run_dir(t: Path, latest: str | None) -> None:
    (t / "run" / "checkpoints").mkdir(parents=True)
    (t / "p.txt").write_text(PROMPTS)
    (t / "run" / "config.yaml").write_text(RECIPE.replace("p.txt", str(t / "p.txt")))
    if latest is not None:
        (t / "run" / "checkpoints" / "latest").write_text(latest)


def _dirs(*names: str) -> Callable[[Path], None]:
    return lambda t: [(t / name).mkdir(parents=True) for name in names]


def _recipe(extra: str = "", **files) -> dict:
    return {"r.yaml": RECIPE + extra, "p.txt": PROMPTS, **files}


TRAIN = ["train", "{t}/r.yaml", "--out", "{t}/run"]

CASES = [
    # recipes
    Case("recipe-missing", ["train", "{t}/nope.yaml", "--out", "{t}/run"], ["nope.yaml", "not found"]),
    Case("recipe-directory", ["train", "{t}/r.yaml", "--out", "{t}/run"], ["r.yaml", "directory"],
         setup=_dirs("r.yaml")),
    Case("recipe-empty", TRAIN, ["r.yaml", "empty"], files={"r.yaml": ""}),
    Case("recipe-comments-only", TRAIN, ["r.yaml", "empty"], files={"r.yaml": "# nothing yet\n"}),
    Case("recipe-binary", TRAIN, ["r.yaml", "not a text YAML file"],
         files={"r.yaml": bytes(range(256)) * 4}, console=True),
    Case("recipe-list", TRAIN, ["r.yaml", "mapping"], files={"r.yaml": "- model\n- ppo\n"}),
    Case("recipe-scalar", TRAIN, ["r.yaml", "mapping"], files={"r.yaml": "sky_red\n"}),
    Case("recipe-syntax", TRAIN, ["r.yaml", "line 3", "not valid YAML"], files={"r.yaml": "model:\n  name: [tiny\n"}),
    Case("recipe-duplicate-section", TRAIN, ["r.yaml", "line 11", "'ppo'", "twice"],
         files=_recipe("ppo:\n  epochs: 1\n"), console=True),
    Case("recipe-duplicate-key", TRAIN, ["r.yaml", "line 3", "'name'"],
         files={"r.yaml": "model:\n  name: tiny\n  name: smollm2-135m-instruct\n"}),
    Case("recipe-unknown-key", TRAIN, ["r.yaml", "rollout.max_new_tokns", "did you mean 'rollout.max_new_tokens'"],
         files={"r.yaml": RECIPE.replace("max_new_tokens", "max_new_tokns"), "p.txt": PROMPTS}),
    Case("recipe-wrong-type", TRAIN, ["r.yaml", "rollout.max_new_tokens", "'lots'"],
         files={"r.yaml": RECIPE.replace("max_new_tokens: 4", "max_new_tokens: lots"), "p.txt": PROMPTS}),
    Case("recipe-out-of-range", TRAIN, ["r.yaml", "ppo.clip_range", "greater than 0"],
         files=_recipe("  clip_range: -0.2\n")),
    Case("recipe-bad-choice", TRAIN, ["r.yaml", "model.critic", "'separate' or 'shared'"],
         files={"r.yaml": RECIPE.replace("prompt_format: chat", "prompt_format: chat\n  critic: shard")}),
    Case("recipe-section-not-mapping", TRAIN, ["r.yaml", "ppo"], files={"r.yaml": "model:\n  name: tiny\nppo: 5\n"}),
    Case("recipe-batch-not-dividing", TRAIN, ["r.yaml", "ppo.minibatch_size 3", "divides 4"],
         files={"r.yaml": RECIPE.replace("minibatch_size: 4", "minibatch_size: 3"), "p.txt": PROMPTS}),
    Case("recipe-micro-not-dividing", TRAIN, ["r.yaml", "ppo.micro_batch_size 3", "divisor of 4"],
         files=_recipe("  micro_batch_size: 3\n")),
    Case("recipe-grpo-one-sample", TRAIN, ["r.yaml", "samples_per_prompt"],
         files=_recipe("  advantage_estimator: grpo\n")),
    Case("recipe-no-prompts", ["train", "{t}/r.yaml", "--out", "{t}/run"], ["data.prompts"],
         files={"r.yaml": "model:\n  name: tiny\n"}),
    Case("train-no-out", ["train", "{t}/r.yaml"], ["--out"], files=_recipe()),
    # --set
    Case("set-no-equals", [*TRAIN, "--set", "ppo.kl_coef"], ["ppo.kl_coef", "dotted.key=value"], files=_recipe()),
    Case("set-empty-key", [*TRAIN, "--set", "=0.1"], ["dotted.key=value"], files=_recipe()),
    Case("set-unknown-key", [*TRAIN, "--set", "ppo.kl_cof=0.1"], ["ppo.kl_cof", "did you mean 'ppo.kl_coef'"],
         files=_recipe()),
    Case("set-wrong-type", [*TRAIN, "--set", "ppo.epochs=many"], ["ppo.epochs", "'many'"], files=_recipe()),
    Case("set-into-a-value", [*TRAIN, "--set", "ppo.minibatch_size.x=1"], ["'minibatch_size' is not a section"],
         files=_recipe()),
    Case("rm-set-unknown-key", ["rm", "train", "--db", "{t}/prefs.db", "--out", "{t}/rm", "--set", "lora_rank=4"],
         ["lora_rank", "lora_r"], setup=_pending_db),
    # --out
    Case("out-is-a-file", TRAIN, ["run", "is a file"], files=_recipe(run="x")),
    Case("out-under-a-file", ["train", "{t}/r.yaml", "--out", "{t}/blocker/run"], ["blocker", "cannot create"],
         files=_recipe(blocker="x"), console=True),
    Case("sweep-out-under-a-file", ["sweep", "{t}/s.yaml", "--out", "{t}/blocker/s"], ["blocker", "cannot create"],
         files=_recipe(**{"s.yaml": "recipe: r.yaml\ngrid:\n  ppo.kl_coef: [0.1]\n", "blocker": "x"})),
    Case("eval-out-under-a-file", ["eval", "--model", "tiny", "--reference", "tiny", "--probes", "{t}/probes.yaml",
                                   "--out", "{t}/blocker/e"], ["blocker", "cannot create"],
         files={"probes.yaml": PROBES, "blocker": "x"}),
    # --resume
    Case("resume-missing", ["train", "--resume", "{t}/gone"], ["gone", "not found"]),
    Case("resume-not-a-run", ["train", "--resume", "{t}/empty"], ["config.yaml", "not a run"], setup=_dirs("empty")),
    Case("resume-broken-config", ["train", "--resume", "{t}/run"], ["config.yaml", "not a text YAML file"],
         setup=lambda t: (_run_dir(t, None), (t / "run" / "config.yaml").write_bytes(b"\x00\xff" * 64))),
    Case("resume-broken-pointer", ["train", "--resume", "{t}/run"], ["latest", "iter_000009"],
         setup=lambda t: _run_dir(t, "iter_000009")),
    # prompt files
    Case("prompts-empty", TRAIN, ["p.txt", "no prompts"], files=_recipe(**{"p.txt": "\n# a comment\n"})),
    Case("prompts-directory", [*TRAIN, "--set", "data.prompts={t}/pdir"], ["pdir", "directory"],
         files=_recipe(), setup=_dirs("pdir")),
    Case("prompts-binary", TRAIN, ["p.txt", "UTF-8"], files=_recipe(**{"p.txt": b"\xff\xfe\x00bad" * 20})),
    Case("prompts-jsonl-line-3", [*TRAIN, "--set", "data.prompts=p.jsonl"], ["p.jsonl:3", "JSON"],
         files=_recipe(**{"p.jsonl": '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n'}), console=True),
    Case("prompts-jsonl-not-object", [*TRAIN, "--set", "data.prompts=p.jsonl"], ["p.jsonl:1", "JSON object"],
         files=_recipe(**{"p.jsonl": '["a", "b"]\n'})),
    Case("prompts-jsonl-no-prompt", [*TRAIN, "--set", "data.prompts=p.jsonl"], ["p.jsonl:1", "'prompt'"],
         files=_recipe(**{"p.jsonl": '{"question": "a"}\n'})),
    Case("prompts-csv-no-column", [*TRAIN, "--set", "data.prompts=p.csv"], ["p.csv:1", "'prompt' column"],
         files=_recipe(**{"p.csv": "question,answer\nwhy,because\n"})),
    Case("sample-prompts-missing", ["sample", "tiny", "--prompts", "{t}/none.txt"], ["none.txt", "not found"]),
    # reward specs and Python reward files
    Case("reward-unknown-kind", [*TRAIN, "--set", "reward.spec=contans:red"], ["contans:red", "contains:red"],
         files=_recipe()),
    Case("reward-bad-weight", TRAIN, ["weight", "finite"],
         files=_recipe("reward:\n  spec:\n    - {spec: 'contains:red', weight: .nan}\n")),
    Case("reward-python-missing-file", [*TRAIN, "--set", "reward.spec=python:nofile.py:score"],
         ["nofile.py", "no such file"], files=_recipe()),
    Case("reward-python-import-raises", [*TRAIN, "--set", "reward.spec=python:bad.py:score"],
         ["bad.py", "ZeroDivisionError"], files=_recipe(**{"bad.py": "x = 1 / 0\n"})),
    Case("reward-python-no-function", [*TRAIN, "--set", "reward.spec=python:rw.py:wrong_cout"],
         ["wrong_cout", "did you mean 'wrong_count'"], files=_recipe(**{"rw.py": REWARD_PY})),
    Case("reward-python-signature", [*TRAIN, "--set", "reward.spec=python:rw.py:one_arg"],
         ["one_arg", "(prompts, completions, metadata)"], files=_recipe(**{"rw.py": REWARD_PY})),
    Case("judge-wrong-count", ["prefs", "judge", "--db", "{t}/prefs.db", "--reward", "python:{t}/rw.py:wrong_count"],
         ["python_wrong_count", "returned 1 values for 2", "one float per completion"],
         files={"rw.py": REWARD_PY}, setup=_pending_db),
    Case("judge-wrong-type", ["prefs", "judge", "--db", "{t}/prefs.db", "--reward", "python:{t}/rw.py:wrong_type"],
         ["python_wrong_type", "one float per completion"], files={"rw.py": REWARD_PY}, setup=_pending_db),
    Case("judge-reward-raises", ["prefs", "judge", "--db", "{t}/prefs.db", "--reward", "python:{t}/rw.py:raises"],
         ["python_raises", "KeyError"], files={"rw.py": REWARD_PY}, setup=_pending_db),
    # preference files and databases
    Case("prefs-import-missing", ["prefs", "import", "{t}/none.jsonl", "--db", "{t}/prefs.db"], ["none.jsonl"]),
    Case("prefs-import-bad-line", ["prefs", "import", "{t}/pairs.jsonl", "--db", "{t}/prefs.db"],
         ["pairs.jsonl:2", "JSON"], files={"pairs.jsonl": PAIRS + '{"prompt": "x",\n'}),
    Case("prefs-import-missing-key", ["prefs", "import", "{t}/pairs.jsonl", "--db", "{t}/prefs.db"],
         ["pairs.jsonl:1", "'rejected'"], files={"pairs.jsonl": '{"prompt": "x", "chosen": "y"}\n'}),
    Case("prefs-import-binary", ["prefs", "import", "{t}/pairs.jsonl", "--db", "{t}/prefs.db"],
         ["pairs.jsonl", "UTF-8"], files={"pairs.jsonl": b"\x89PNG\r\n\x1a\n\x00\x00"}),
    Case("prefs-db-not-sqlite", ["prefs", "stats", "--db", "{t}/prefs.db"], ["prefs.db", "not a usable SQLite"],
         files={"prefs.db": "pairs, but as text\n" * 100}),
    Case("prefs-db-missing", ["prefs", "export", "--db", "{t}/none.db", "--out", "{t}/o.jsonl"],
         ["none.db", "prefs import"]),
    Case("prefs-db-directory", ["prefs", "label", "--db", "{t}/dbdir"], ["dbdir", "directory"],
         setup=_dirs("dbdir")),
    Case("prefs-export-no-folder", ["prefs", "export", "--db", "{t}/prefs.db", "--out", "{t}/nodir/o.jsonl"],
         ["nodir", "does not exist"], setup=_pending_db),
    Case("rm-db-not-sqlite", ["rm", "train", "--db", "{t}/prefs.db", "--out", "{t}/rm"], ["prefs.db"],
         files={"prefs.db": b"\x00\x01garbage" * 50}),
    Case("rm-jsonl-bad-line", ["rm", "train", "--db", "{t}/pairs.jsonl", "--out", "{t}/rm"], ["pairs.jsonl:1"],
         files={"pairs.jsonl": "not json\n"}),
    # sweep and loop files
    Case("sweep-typo", ["sweep", "{t}/s.yaml", "--out", "{t}/s"], ["s.yaml", "'seed'", "did you mean 'seeds'"],
         files=_recipe(**{"s.yaml": "recipe: r.yaml\nseed: [0, 1]\n"})),
    Case("sweep-grid-typo", ["sweep", "{t}/s.yaml", "--out", "{t}/s"], ["ppo.kl_cof", "ppo.kl_coef"],
         files=_recipe(**{"s.yaml": "recipe: r.yaml\ngrid:\n  ppo.kl_cof: [0.1, 0.2]\n"})),
    Case("sweep-duplicate-key", ["sweep", "{t}/s.yaml", "--out", "{t}/s"], ["s.yaml", "line 3", "'seeds'"],
         files=_recipe(**{"s.yaml": "recipe: r.yaml\nseeds: [0]\nseeds: [1]\n"})),
    Case("sweep-recipe-missing", ["sweep", "{t}/s.yaml", "--out", "{t}/s"], ["gone.yaml", "not found"],
         files={"s.yaml": "recipe: gone.yaml\n"}),
    Case("loop-typo", ["rlhf", "{t}/loop.yaml", "--out", "{t}/l"], ["loop.yaml", "did you mean 'rounds'"],
         files=_recipe(**{"loop.yaml": "recipe: r.yaml\nround: 2\njudge: vader\n"})),
    Case("loop-no-recipe", ["rlhf", "{t}/loop.yaml", "--out", "{t}/l"], ["loop.yaml", "missing key 'recipe'"],
         files={"loop.yaml": "rounds: 2\n"}),
    Case("loop-bad-judge", ["rlhf", "{t}/loop.yaml", "--out", "{t}/l"], ["vadr", "vader"],
         files=_recipe(**{"loop.yaml": "recipe: r.yaml\njudge: vadr\n"})),
    # probe files
    Case("probes-missing", ["eval", "--model", "tiny", "--reference", "tiny", "--probes", "{t}/none.yaml",
                            "--out", "{t}/e"], ["none.yaml", "not found"]),
    Case("probes-typo", ["eval", "--model", "tiny", "--reference", "tiny", "--probes", "{t}/probes.yaml",
                         "--out", "{t}/e"], ["probes.yaml", "'group'", "did you mean 'groups'"],
         files={"probes.yaml": PROBES.replace("groups", "group")}),
    Case("probes-duplicate-group", ["eval", "--model", "tiny", "--reference", "tiny", "--probes",
                                    "{t}/probes.yaml", "--out", "{t}/e"], ["probes.yaml", "line 4", "'trained'"],
         files={"probes.yaml": PROBES + "  trained: [\"Name a colour.\"]\n"}),
    Case("probes-binary", ["eval", "--model", "tiny", "--reference", "tiny", "--probes", "{t}/probes.yaml",
                           "--out", "{t}/e"], ["probes.yaml", "not a text YAML file"],
         files={"probes.yaml": b"\x00\x9c\xff" * 30}),
    Case("probes-in-recipe", TRAIN, ["probes.yaml", "groups"],
         files=_recipe("eval:\n  probes: probes.yaml\n", **{"probes.yaml": "behavior: contains:red\ngroups: {}\n"})),
    # runs given to report, compare, eval, chat
    Case("report-not-a-run", ["report", "{t}/empty"], ["metrics.jsonl", "rlhflab train"], setup=_dirs("empty")),
    Case("compare-not-a-run", ["compare", "{t}/empty", "--out", "{t}/c"], ["metrics.jsonl"], setup=_dirs("empty")),
    Case("compare-sweep-missing", ["compare", "--sweep", "{t}/nosweep"], ["nosweep", "rlhflab sweep"]),
    Case("eval-not-a-run", ["eval", "{t}/empty", "--probes", "{t}/probes.yaml"], ["--reference"],
         files={"probes.yaml": PROBES}, setup=_dirs("empty")),
    Case("chat-missing-model", ["chat", "{t}/no-model-here"], ["no-model-here"]),
]


def _prepare(case: Case, t: Path) -> list[str]:
    for name, content in case.files.items():
        path = t / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    if case.setup is not None:
        case.setup(t)
    return [arg.replace("{t}", str(t)) for arg in case.argv]


def _check(case: Case, code: int, output: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output
    assert "Traceback" not in output and "Warning" not in output, output
    assert 1 <= len(lines) <= 3, output
    missing = [s for s in case.expect if s not in output]
    assert not missing, f"{missing} not in: {output}"


def test_the_table_covers_every_command():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    commands = {" ".join(c.argv[:2]) if c.argv[0] in ("prefs", "rm") else c.argv[0] for c in CASES}
    assert commands >= {"train", "sample", "chat", "eval", "report", "compare", "sweep", "rlhf", "rm train",
                        "prefs import", "prefs export", "prefs stats", "prefs label", "prefs judge"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths in --set resolve here, as a user's would in their folder
    argv = _prepare(case, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, argv)
    _check(case, result.exit_code, result.output)
    assert not [str(w.message) for w in caught]


@pytest.mark.parametrize("case", [c for c in CASES if c.console], ids=[c.id for c in CASES if c.console])
def test_bad_input_on_the_console(case, tmp_path):
    argv = _prepare(case, tmp_path)
    env = {**os.environ, "PYTHONWARNINGS": "default", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rlhflab", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    _check(case, proc.returncode, proc.stdout + proc.stderr)
