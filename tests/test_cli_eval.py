"""`rlhflab train` with probes, `rlhflab eval` and `rlhflab report` on a tiny run, through the real CLI."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlhflab.cli import app
from rlhflab.evaluation.probes import METRICS

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "tiny.yaml"
GROUPS = ("trained", "unrelated")
PROBES = """\
behavior: "regex:[aeiou]"
samples_per_prompt: 2
max_new_tokens: 8
groups:
  trained: ["What color is the sky?", "Describe the sky."]
  unrelated: ["What is 2 + 2?"]
"""
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops take microseconds: a second thread only adds synchronisation (see test_evaluate)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("probes") / "probes.yaml"
    path.write_text(PROBES)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, probes) -> Path:
    """A 2-iteration tiny run with a probe evaluation every iteration, a final one and the report."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = runner.invoke(app, [
        "train", str(RECIPE), "--out", str(out), "-q", "--set", "train.iterations=2",
        "--set", f"eval.probes={probes}", "--set", "eval.every=1",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_eval(eval_dir: Path) -> dict:
    """eval.json holds every group, side and metric; answers.jsonl one row per probe prompt."""
    result = json.loads((eval_dir / "eval.json").read_text())
    assert set(result["groups"]) == set(GROUPS)
    for sides in result["groups"].values():
        assert set(sides) == {"policy", "reference"}
        assert all(set(metrics) == set(METRICS) for metrics in sides.values())
        assert sides["reference"]["kl_k1"] == sides["reference"]["kl_k3"] == 0.0
    answers = read_jsonl(eval_dir / "answers.jsonl")
    assert [a["group"] for a in answers] == ["trained", "trained", "unrelated"]
    return result


def test_train_logs_probe_metrics_and_writes_eval_and_report(run_dir):
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == 2
    for row in rows:
        for group in GROUPS:
            assert 0 <= row[f"eval/{group}/behavior_rate"] <= 1
            assert row[f"eval/{group}/kl_k3"] >= 0
        assert "diversity/distinct_2" in row
    check_eval(run_dir / "eval")
    assert (run_dir / "report.html").is_file() and (run_dir / "report.md").is_file()
    assert (run_dir / "final" / "config.json").is_file()


def test_eval_a_run_prints_the_table(run_dir, probes, tmp_path):
    result = runner.invoke(app, ["eval", str(run_dir), "--probes", str(probes), "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert "| trained | policy |" in result.stdout and "| unrelated | reference |" in result.stdout
    evaluation = check_eval(tmp_path / "ev")
    assert evaluation["policy"] == str(run_dir / "final") and evaluation["reference"] == "tiny"
    # the same evaluation as the one at the end of training, up to the seed (0 in both)
    in_training = json.loads((run_dir / "eval" / "eval.json").read_text())["groups"]
    for group, sides in evaluation["groups"].items():
        for side, metrics in sides.items():
            assert metrics == pytest.approx(in_training[group][side], rel=1e-4, abs=1e-5)


def test_eval_two_models(probes, tmp_path):
    out = tmp_path / "ev"
    result = runner.invoke(app, ["eval", "--model", "tiny", "--reference", "tiny", "--probes", str(probes),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    for sides in check_eval(out)["groups"].values():  # a model against itself: KL 0 up to float rounding
        assert abs(sides["policy"]["kl_k1"]) < 1e-5 and 0 <= sides["policy"]["kl_k3"] < 1e-9


def test_report_holds_the_plots(run_dir):
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert str(run_dir / "report.html") in result.stdout
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6
    assert 'alt="Behaviour rate per probe group"' in html and "Greedy answers before and after" in html
    assert (run_dir / "plots" / "behavior_by_group.png").is_file()


@pytest.mark.parametrize(
    "text, expected",
    [("behavior: contains:red\ngrups:\n  a: [x]\n", "unknown key 'grups'; did you mean 'groups'?"),
     ("behavior: contains:red\ngroups:\n  a: []\n", "group 'a' has no prompts")],
    ids=["unknown-key", "empty-group"],
)
def test_bad_probe_file_exits_2_with_one_line(tmp_path, text, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = runner.invoke(app, ["eval", "--model", "tiny", "--reference", "tiny", "--probes", str(bad),
                                 "--out", str(tmp_path / "ev")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and expected in lines[0]


def test_train_with_a_bad_probe_file_fails_before_loading(tmp_path):
    result = runner.invoke(app, ["train", str(RECIPE), "--out", str(tmp_path / "run"), "-q",
                                 "--set", f"eval.probes={tmp_path / 'missing.yaml'}"])
    assert result.exit_code == 2 and "missing.yaml' not found" in result.stderr
    assert not (tmp_path / "run").exists()


def test_eval_needs_a_run_or_a_model(probes, tmp_path):
    result = runner.invoke(app, ["eval", "--probes", str(probes)])
    assert result.exit_code == 2 and "give a run directory or --model" in result.stderr
    result = runner.invoke(app, ["eval", "--model", "tiny", "--probes", str(probes), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--reference" in result.stderr


def test_eval_measures_another_behavior(probes, tmp_path):
    """--behavior replaces the probe file's behaviour: a spec that never matches gives 0 on every group and side."""
    out = tmp_path / "ev"
    result = runner.invoke(app, ["eval", "--model", "tiny", "--reference", "tiny", "--probes", str(probes),
                                 "--out", str(out), "--behavior", "regex:(?!)"])
    assert result.exit_code == 0, result.output
    evaluation = check_eval(out)
    assert evaluation["behavior"] == "regex:(?!)"
    rates = [side["behavior_rate"] for sides in evaluation["groups"].values() for side in sides.values()]
    assert rates == [0.0] * 2 * len(GROUPS)
    bad = runner.invoke(app, ["eval", "--model", "tiny", "--reference", "tiny", "--probes", str(probes),
                              "--out", str(tmp_path / "bad"), "--behavior", "contians:red"])
    assert bad.exit_code == 2 and "contians" in bad.output and len(bad.output.strip().splitlines()) == 1
