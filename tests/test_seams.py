"""Seams: one reward-model config for `rm train`, the loop and the API; one sampling loader; no process-wide
side effect (seeding, malloc tuning, transformers' logging) hidden in a function named for something else."""

import json
import random

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from rlhflab.cli import app
from rlhflab.config import RewardModelConfig
from rlhflab.errors import UserError
from rlhflab.pipelines.rlhf_loop import judge_score, load_loop_config
from rlhflab.pipelines.train import train
from rlhflab.ppo.trainer import PPOTrainer
from rlhflab.runs.seeding import seed_everything
from rlhflab.runs.tracking import MACHINE_METRICS, Tracker

runner = CliRunner()
RM_KEYS = {"base": "tiny", "lora": False, "lora_r": 4, "lora_alpha": 8.0, "epochs": 3, "lr": 3e-4, "batch_size": 16,
           "margin": 0.5, "heldout_fraction": 0.2, "max_length": 128, "calibration_samples": 64}


def write_loop(tmp_path, rm: dict):
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump({"recipe": "ppo.yaml", "rm": rm}))
    return path


def test_rm_defaults_match_the_documented_ones():
    c = RewardModelConfig()
    assert (c.base, c.lora, c.lora_r, c.epochs, c.batch_size, c.margin, c.heldout_fraction, c.max_length,
            c.calibration_samples) == (None, True, 16, 2, 8, 0.0, 0.1, 256, 512)
    assert c.learning_rate == 2e-4 and RewardModelConfig(lora=False).learning_rate == 1e-5
    assert RewardModelConfig(lr=3e-4).learning_rate == 3e-4


@pytest.fixture
def rm_train_config(tmp_path, monkeypatch):
    """Runs `rlhflab rm train ARGS...` up to the training call; returns the RewardModelConfig it passed."""
    import rlhflab.rewards.reward_model as rm

    seen = []

    def capture(data, out, config, **kwargs):
        seen.append(config)
        raise UserError("captured")

    monkeypatch.setattr(rm, "train_reward_model", capture)

    def run(*args: str) -> RewardModelConfig:
        result = runner.invoke(app, ["rm", "train", "--db", "prefs.db", "--out", str(tmp_path / "rm"), *args])
        assert "captured" in result.output, result.output
        return seen[-1]

    return run


def test_loop_rm_section_and_rm_train_options_build_the_same_config(tmp_path, rm_train_config):
    loop, _ = load_loop_config(write_loop(tmp_path, RM_KEYS))
    from_cli = rm_train_config(
        "--base", "tiny", "--no-lora", "--lora-r", "4", "--epochs", "3", "--lr", "3e-4", "--batch-size", "16",
        "--margin", "0.5", "--heldout-fraction", "0.2", "--max-length", "128", "--calibration-samples", "64",
        "--set", "lora_alpha=8")
    assert isinstance(loop.rm, RewardModelConfig)
    assert from_cli == loop.rm == RewardModelConfig(**RM_KEYS)


def test_rm_train_without_options_uses_the_config_defaults(rm_train_config):
    assert rm_train_config() == RewardModelConfig()


def test_unknown_key_in_the_loop_rm_section_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError) as err:
        load_loop_config(write_loop(tmp_path, {"lora": True, "learning_rate": 1e-3}))
    message = str(err.value)
    assert "unknown key 'rm.learning_rate'" in message and "loop.yaml" in message and "\n" not in message


def test_rm_train_bad_keys_are_one_line_errors(tmp_path):
    result = runner.invoke(app, ["rm", "train", "--db", "x.db", "--out", str(tmp_path / "rm"), "--set", "lr_rate=1"])
    assert result.exit_code == 2 and "unknown key 'lr_rate'" in result.output
    assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["rm", "train", "--db", "x.db", "--out", str(tmp_path / "rm"), "--epochs", "0"])
    assert result.exit_code == 2 and "epochs" in result.output and "greater than or equal to 1" in result.output


# ---------------------------------------------------------------------------------------------------
# loading for sampling


def test_load_for_sampling_gives_an_eval_model_and_a_left_padding_tokenizer():
    from rlhflab.models.loading import load_for_sampling

    model, tokenizer, device, fmt, precision = load_for_sampling("tiny", "cpu", "float32")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert device == torch.device("cpu") and fmt == "chat"  # tiny has a chat template
    assert precision.name == "fp32" and not precision.bf16_compute
    assert load_for_sampling("tiny", prompt_format="plain").prompt_format == "plain"


# ---------------------------------------------------------------------------------------------------
# process-wide state: only entry points set it


def test_pick_device_and_loading_leave_process_settings_alone(monkeypatch):
    from transformers.utils import logging

    from rlhflab.models import loading

    calls = []
    monkeypatch.setattr(loading, "keep_freed_memory", lambda: calls.append("mallopt"))
    loading.pick_device("cpu")
    assert calls == []
    before = logging.get_verbosity()
    logging.set_verbosity_warning()
    try:
        loading.load_tokenizer("tiny")
        assert logging.get_verbosity() == logging.WARNING
    finally:
        logging.set_verbosity(before)


def test_the_trainer_does_not_reseed_the_process(tiny_config, tmp_path):
    random.seed(7)
    np.random.seed(7)
    expected = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    PPOTrainer(tiny_config, tmp_path)
    assert (random.random(), np.random.rand()) == expected


def _metrics(config, run_dir, iterations):
    trainer = PPOTrainer(config, run_dir)
    tracker = Tracker(run_dir, [], "t", "t", {})
    rows = [trainer.iteration_step(tracker) for _ in range(iterations)]
    return [{k: v for k, v in row.items() if not k.startswith(MACHINE_METRICS)} for row in rows]


def test_a_seeded_caller_gets_the_same_run_twice(tiny_config, tmp_path):
    seed_everything(3)
    first = _metrics(tiny_config, tmp_path / "a", 2)
    seed_everything(3)
    assert _metrics(tiny_config, tmp_path / "b", 2) == first


def test_train_seeds_and_tunes_malloc_and_resume_is_bit_exact(tiny_config, tmp_path, monkeypatch):
    from rlhflab.models import loading

    calls = []
    monkeypatch.setattr(loading, "keep_freed_memory", lambda: calls.append("mallopt"))
    tiny_config.train.iterations = 3
    tiny_config.train.checkpoint_every = 1
    torch.manual_seed(123)  # train() seeds with train.seed whatever the caller's state
    train(tiny_config, tmp_path / "straight", quiet=True)
    assert calls == ["mallopt"]
    tiny_config.train.iterations = 2
    train(tiny_config, tmp_path / "resumed", quiet=True)
    tiny_config.train.iterations = 3
    train(tiny_config, tmp_path / "resumed", resume=True, quiet=True)

    def rows(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith(MACHINE_METRICS)}
                for line in lines]

    assert rows("resumed") == rows("straight")


def test_judge_score_leaves_the_callers_random_state(prompt_file):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    score = judge_score("tiny", prompt_file, lambda p, c, m: [1.0] * len(c), samples_per_prompt=1, max_new_tokens=4,
                        temperature=1.0)
    assert score == 1.0 and torch.equal(torch.rand(3), expected)
