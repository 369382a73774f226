"""The command line: a smoke run of recipes/tiny.yaml, and every kind of bad input → exit 2, one clear line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhflab.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_train_tiny_recipe_smoke(tmp_path):
    out = tmp_path / "run"
    code, output = _run("train", ROOT / "recipes/tiny.yaml", "--out", out, "-q", "--set", "eval.report=false")
    assert code == 0, output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    required = ["objective/scores", "objective/rlhf_reward", "objective/kl", "objective/kl_coef", "objective/entropy",
                "policy/approxkl", "policy/clipfrac", "policy/ratio_mean", "loss/policy", "loss/value",
                "value/explained_variance", "value/clipfrac", "rollout/response_length", "rollout/eos_rate",
                "reward/regex", "time/rollout", "time/update", "time/iteration", "throughput/tokens_per_s"]
    assert not [k for k in required if k not in rows[-1]]
    assert (out / "config.yaml").is_file() and (out / "samples.jsonl").is_file()
    assert (out / "final" / "config.json").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "iter_000003"


def test_resume_cli(tmp_path):
    out = tmp_path / "run"
    assert _run("train", ROOT / "recipes/tiny.yaml", "--out", out, "-q", "--set", "train.iterations=2",
                "--set", "eval.report=false")[0] == 0
    code, output = _run("train", "--resume", out, "-q", "--set", "train.iterations=3")
    assert code == 0, output
    assert [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").open()] == [1, 2, 3]


def _bad(tmp_path, *args):
    code, output = _run(*args)
    assert code == 2, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, output
    assert "Traceback" not in output
    return output


def test_unknown_key_suggests_nearest(tmp_path):
    out = _bad(tmp_path, "train", ROOT / "recipes/tiny.yaml", "--out", tmp_path / "r", "--set", "ppo.kl_cof=0.1")
    assert "ppo.kl_cof" in out and "ppo.kl_coef" in out


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: tiny\nrollout:\n  max_new_tokns: 8\n")
    out = _bad(tmp_path, "train", recipe, "--out", tmp_path / "r")
    assert str(recipe) in out and "rollout.max_new_tokens" in out


def test_missing_recipe(tmp_path):
    out = _bad(tmp_path, "train", tmp_path / "nope.yaml", "--out", tmp_path / "r")
    assert "nope.yaml" in out and "not found" in out


def test_unparsable_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: [tiny\n")
    out = _bad(tmp_path, "train", recipe, "--out", tmp_path / "r")
    assert "r.yaml" in out and "line" in out


def test_bad_prompt_file_line(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n')
    out = _bad(tmp_path, "train", ROOT / "recipes/tiny.yaml", "--out", tmp_path / "r", "--set",
               f"data.prompts={prompts}")
    assert "p.jsonl:2" in out


def test_broken_reward_spec(tmp_path):
    out = _bad(tmp_path, "train", ROOT / "recipes/tiny.yaml", "--out", tmp_path / "r", "--set",
               "reward.spec=contans:red")
    assert "contans:red" in out and "contains" in out


def test_missing_resume_dir(tmp_path):
    out = _bad(tmp_path, "train", "--resume", tmp_path / "missing")
    assert "missing" in out


def test_batch_sizes_checked(tmp_path):
    out = _bad(tmp_path, "train", ROOT / "recipes/tiny.yaml", "--out", tmp_path / "r", "--set",
               "ppo.minibatch_size=5")
    assert "minibatch_size" in out and "16" in out


def test_chat_format_without_template(tmp_path):
    from transformers import AutoTokenizer

    from rlhflab.models.loading import resolve_model_dir

    model_dir = tmp_path / "plain-model"
    subprocess.run([sys.executable, "-c", f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
src = {resolve_model_dir('tiny')!r}
AutoModelForCausalLM.from_pretrained(src).save_pretrained({str(model_dir)!r})
tok = AutoTokenizer.from_pretrained(src); tok.chat_template = None; tok.save_pretrained({str(model_dir)!r})
"""], check=True)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    assert not AutoTokenizer.from_pretrained(model_dir).chat_template
    out = _bad(tmp_path, "train", ROOT / "recipes/tiny.yaml", "--out", tmp_path / "r", "--set",
               f"model.name={model_dir}")
    assert "chat template" in out and "plain" in out


def test_offline_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = _bad(tmp_path, "train", ROOT / "recipes/tiny.yaml", "--out", tmp_path / "r", "--set",
               "model.name=someone/not-a-local-model")
    assert "someone/not-a-local-model" in out and "local" in out


def test_sample_command(tmp_path):
    train_out = tmp_path / "run"
    assert _run("train", ROOT / "recipes/tiny.yaml", "--out", train_out, "-q", "--set", "train.iterations=1",
                "--set", "eval.report=false")[0] == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nworld\n")
    code, output = _run("sample", train_out, "--prompts", prompts, "--max-new-tokens", "4")
    assert code == 0, output
    rows = [json.loads(line) for line in output.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "world"]


@pytest.mark.parametrize("name", ["sky_red.yaml", "sky_red_broad.yaml", "tiny.yaml"])
def test_shipped_recipes_validate(name):
    from rlhflab.config import load_config
    from rlhflab.data.prompts import load_prompts
    from rlhflab.evaluation.probes import load_probes
    from rlhflab.ppo.groups import group_rewards

    config = load_config(ROOT / "recipes" / name)
    assert all(load_prompts(group.prompts) for group in config.prompt_groups)
    group_rewards(config.prompt_groups, config.reward.spec)  # every reward spec builds
    if config.eval.probes:
        load_probes(config.eval.probes).behavior_reward()
