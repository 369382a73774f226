"""The RLHF loop on the tiny model: two rounds end to end, resuming without redoing finished work, and the
human-label stop."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rlhflab.cli import app
from rlhflab.errors import UserError
from rlhflab.pipelines.rlhf_loop import load_loop_config, ppo_config
from rlhflab.preferences.store import PreferenceStore

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()

def run(loop: Path, out: Path) -> str:
    result = runner.invoke(app, ["rlhf", str(loop), "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return result.output


def test_two_round_loop_end_to_end_and_resume(loop_file, tmp_path):
    out = tmp_path / "run"
    run(loop_file, out)
    summary = json.loads((out / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["pairs"] == 6
        assert 0.0 <= r["rm_accuracy"] <= 1.0
        assert all(isinstance(r[k], float) for k in ("judge_score_before", "judge_score_after", "kl"))
    assert rounds[1]["judge_score_before"] == rounds[0]["judge_score_after"]  # same model, same seeded samples
    assert rounds[0]["policy"] == "tiny" and rounds[1]["policy"] == str(out / "round_1" / "ppo" / "final")
    assert rounds[1]["labeled_pairs"] > rounds[0]["labeled_pairs"]  # round 2's RM trains on both rounds' labels
    rm_info = json.loads((out / "round_2" / "rm" / "rlhflab_rm.json").read_text())
    assert rm_info["calibration_source"] == "reference samples" and rm_info["calibration_samples"] == 8  # of 12
    ppo = yaml.safe_load((out / "round_2" / "ppo" / "config.yaml").read_text())
    assert ppo["reward"]["spec"] == f"model:{out / 'round_2' / 'rm'}" and ppo["ppo"]["kl_coef"] == 0.1
    assert ppo["model"]["name"] == rounds[1]["policy"]
    with PreferenceStore(out / "prefs.db", create=False) as store:
        assert store.count_pairs() == 12 and store.count_labeled("judge:python:judge.py:score") == 12

    # finished: a re-run changes nothing
    finished = (out / "summary.json").read_text()
    stamp = (out / "round_1" / "rm" / "rlhflab_rm.json").stat().st_mtime_ns
    run(loop_file, out)
    assert (out / "summary.json").read_text() == finished

    # interrupted during round 2's PPO: round 1 is kept, round 2's pairs and labels are reused
    (out / "summary.json").write_text(json.dumps({"rounds": rounds[:1]}))
    shutil.rmtree(out / "round_2" / "ppo")
    run(loop_file, out)
    resumed = json.loads((out / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in resumed] == [1, 2] and resumed[0] == rounds[0]
    assert (out / "round_1" / "rm" / "rlhflab_rm.json").stat().st_mtime_ns == stamp
    assert (out / "round_2" / "ppo" / "final" / "config.json").is_file()
    with PreferenceStore(out / "prefs.db", create=False) as store:
        assert store.count_pairs() == 12


def test_without_a_judge_the_loop_waits_for_human_labels(loop_file, tmp_path):
    loop = yaml.safe_load(loop_file.read_text())
    loop.update(judge=None, rounds=1)
    loop_file.write_text(yaml.safe_dump(loop))
    out = tmp_path / "run"
    output = run(loop_file, out)
    assert "rlhflab prefs label --db" in output and not (out / "summary.json").exists()
    with PreferenceStore(out / "prefs.db", create=False) as store:
        pairs = store.pairs()
        assert len(pairs) == 6
        store.record_labels([(p.id, "human", "ab"[i % 2], None) for i, p in enumerate(pairs)])
    run(loop_file, out)
    (row,) = json.loads((out / "summary.json").read_text())["rounds"]
    assert row["pairs"] == 6 and row["judge_score_before"] is None and row["kl"] is not None


def test_loop_file_errors_and_paths(loop_file, tmp_path):
    config, base = load_loop_config(loop_file)
    assert config.recipe == str(tmp_path / "ppo.yaml") and base == tmp_path
    assert ppo_config(config).model.name == "tiny"
    loop_file.write_text(yaml.safe_dump({"recipe": "ppo.yaml", "pairs": 3}))
    with pytest.raises(UserError, match="unknown key 'pairs'"):
        load_loop_config(loop_file)


@pytest.mark.parametrize("name", ["rlhf_loop.yaml", "rlhf_one_round.yaml"])
def test_shipped_loop_recipes_validate(name):
    config, _ = load_loop_config(ROOT / "recipes" / name)
    assert config.judge == "vader" and config.judge_margin == 0.6
    ppo = ppo_config(config)
    assert ppo.model.prompt_format == "plain" and Path(ppo.data.prompts).is_file()
    assert Path(config.heldout_prompts).is_file() and Path(config.prompts).is_file()
