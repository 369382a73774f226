"""Non-finite numbers never reach the weights: NaN/inf injected at the reward, the reward model's logits, the
advantages, the loss and the gradients; every weight stays finite, each is counted, a run with nothing usable
for `train.nonfinite_patience` iterations saves a checkpoint and exits 3 with one line."""

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import rlhflab.ppo.trainer as trainer_module
from rlhflab.cli import app
from rlhflab.config import RewardModelConfig
from rlhflab.errors import NonFiniteAbort
from rlhflab.pipelines.train import train
from rlhflab.ppo.trainer import PPOTrainer
from rlhflab.rewards.reward_model import ScalarRewardModel, train_reward_model
from rlhflab.runs.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent
NAN = float("nan")


def _all_finite(trainer) -> bool:
    params = list(trainer.policy.parameters()) + trainer.critic.parameters()
    return all(torch.isfinite(p).all() for p in params)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_nan_reward_for_one_sample_per_batch_leaves_it_out(tiny_config, tmp_path, capsys):
    def flaky(prompts, completions, metadata):  # a flaky reward model: one sample per batch has no reward
        return [NAN] + [float(len(c) % 3) for c in completions[1:]]

    tiny_config.train.save_final = True
    trainer = train(tiny_config, tmp_path / "run", reward=flaky)
    rows = _rows(tmp_path / "run")
    assert [r["reward/nonfinite"] for r in rows] == [1.0, 1.0]
    assert all(r["policy/skipped_nonfinite"] == 0.0 and r["policy/optimizer_steps"] > 0 for r in rows)
    assert all(math.isfinite(r["objective/scores"]) and math.isfinite(r["reward/flaky"]) for r in rows)
    assert _all_finite(trainer) and (tmp_path / "run" / "final" / "config.json").is_file()
    err = capsys.readouterr().err
    assert err.count("counted as reward/nonfinite") == 1 and "reward 'flaky' returned nan for sample 0" in err


def test_nan_reward_for_every_sample_exits_3_with_a_checkpoint_and_resumes(tmp_path):
    reward_file = tmp_path / "reward.py"
    broken = tmp_path / "broken"
    broken.touch()
    reward_file.write_text(
        "from pathlib import Path\n\n"
        "def score(prompts, completions, metadata):\n"
        f"    return [float('nan') if Path({str(broken)!r}).exists() else 1.0 for _ in completions]\n")
    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(ROOT / "recipes/tiny.yaml"), "--out", str(out), "-q",
                                 "--set", f"reward.spec=python:{reward_file}:score", "--set", "train.iterations=5",
                                 "--set", "train.nonfinite_patience=3", "--set", "eval.report=false"])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "every sample in 3 consecutive iterations (last: iteration 3)" in lines[0]
    assert "checkpoint at" in lines[0] and "--resume" in lines[0]
    assert (out / "checkpoints" / "latest").read_text() == "iter_000003"
    assert [r["reward/nonfinite"] for r in _rows(out)] == [16.0] * 3
    assert not (out / "final").exists()
    broken.unlink()  # the reward is fixed: the run continues where it stopped
    result = runner.invoke(app, ["train", "--resume", str(out), "-q"])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["reward/nonfinite"] == 0.0
    assert (out / "final" / "config.json").is_file()


def _nan_first_call(fn, where):
    """`fn` with NaN written into its output `where(out)` on the first call only."""
    calls = []

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        if not calls:
            out = where(out)
        calls.append(1)
        return out

    return wrapped


def _nan_row0(out):
    advantages, returns = out
    advantages = advantages.clone()
    advantages[0] = NAN
    return advantages, returns


@pytest.mark.parametrize("inject", ["advantages", "loss", "gradients"])
def test_nan_in_advantages_loss_or_gradients_never_reaches_the_weights(tiny_config, tmp_path, monkeypatch, inject):
    if inject == "advantages":
        monkeypatch.setattr(trainer_module, "gae", _nan_first_call(trainer_module.gae, _nan_row0))
    elif inject == "loss":
        monkeypatch.setattr(trainer_module, "policy_loss", _nan_first_call(
            trainer_module.policy_loss, lambda out: (out[0] * NAN, out[1])))
    trainer = PPOTrainer(tiny_config, tmp_path)
    if inject == "gradients":
        param = trainer.policy_params[0]
        hits = []
        param.register_hook(lambda g: hits.append(1) or (torch.full_like(g, NAN) if len(hits) == 1 else g))
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    row = trainer.iteration_step(Tracker(tmp_path, [], "t", "t", {}))
    assert _all_finite(trainer)
    assert any(not torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters())  # it still learned
    steps = tiny_config.ppo.epochs * tiny_config.rollout_batch_size // tiny_config.ppo.minibatch_size
    if inject == "advantages":  # the sample is dropped before whitening could spread its NaN: no step lost
        assert row["policy/nonfinite_advantages"] == 1.0 and row["policy/skipped_nonfinite"] == 0.0
        assert row["policy/optimizer_steps"] == steps
    else:
        assert row["policy/skipped_nonfinite"] == 1.0 and row["policy/optimizer_steps"] == steps - 1
    assert trainer.nonfinite_streak == 0


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    rows = [{"prompt": f"Review {i}:", "chosen": " it was good", "rejected": " it was bad"} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


RM_CONFIG = RewardModelConfig(base="tiny", lora=False, epochs=1, lr=3e-3, batch_size=4, heldout_fraction=0.0)


def _nan_scores(monkeypatch, calls_with_nan):
    """ScalarRewardModel's logits become NaN on the calls numbered in `calls_with_nan` (None: every call)."""
    forward, calls = ScalarRewardModel.forward, []

    def nan_forward(self, input_ids, attention_mask):
        calls.append(1)
        scores = forward(self, input_ids, attention_mask)
        if calls_with_nan is None or len(calls) in calls_with_nan:
            scores = scores * NAN
        return scores

    monkeypatch.setattr(ScalarRewardModel, "forward", nan_forward)


def test_reward_model_training_skips_a_nan_step_and_stops_after_patience(prefs, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _nan_scores(m, {2})  # the second of 4 training steps
        info = train_reward_model(prefs, tmp_path / "rm", RM_CONFIG, prompt_format="plain", quiet=True)
    assert info["history"][0]["skipped_nonfinite"] == 1 and math.isfinite(info["history"][0]["loss"])
    assert math.isfinite(info["gain"]) and math.isfinite(info["bias"])
    _nan_scores(monkeypatch, None)
    config = RM_CONFIG.model_copy(update={"nonfinite_patience": 3})
    with pytest.raises(NonFiniteAbort, match="NaN/inf in 3 consecutive steps.*nothing was saved"):
        train_reward_model(prefs, tmp_path / "rm2", config, prompt_format="plain", quiet=True)
    assert not (tmp_path / "rm2").exists() or not any((tmp_path / "rm2").iterdir())


def test_nan_reward_model_logit_leaves_its_sample_out(prefs, tiny_config, tmp_path, monkeypatch):
    rm_dir = tmp_path / "rm"
    train_reward_model(prefs, rm_dir, RM_CONFIG, prompt_format="chat", quiet=True)
    tiny_config.reward.spec = f"model:{rm_dir}"
    trainer = PPOTrainer(tiny_config, tmp_path / "run")
    head = trainer.rewards[0].components[0][2].model.head

    def first_logit_nan(module, inputs, output):
        output = output.clone()
        output[0] = NAN
        return output

    head.register_forward_hook(first_logit_nan)  # one NaN logit per scoring batch of the RM
    row = trainer.iteration_step(Tracker(tmp_path / "run", [], "t", "t", {}))
    assert row["reward/nonfinite"] >= 1.0 and math.isfinite(row["objective/scores"])
    assert row["policy/skipped_nonfinite"] == 0.0 and _all_finite(trainer)
