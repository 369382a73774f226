"""Reward model on the tiny model: learns a separable preference set, normalises, loads in transformers and as
`model:RM_DIR`; `prefs generate` and `rm train` from the command line."""

import json
import random
import statistics

import pytest
import torch
from typer.testing import CliRunner

from rlhflab.cli import app
from rlhflab.config import RewardModelConfig
from rlhflab.errors import UserError
from rlhflab.preferences.store import Candidate, NewPair, PreferenceStore
from rlhflab.rewards.reward_model import (
    PreferencePair,
    calibration_table,
    expected_calibration_error,
    last_real_index,
    load_preferences,
    load_reward_model,
    split_by_prompt,
    train_reward_model,
)
from rlhflab.rewards.specs import build_reward

runner = CliRunner()
SUBJECTS = ["the film", "this movie", "the plot", "the cast", "the ending", "the music", "the story", "the acting",
            "the script", "the pacing", "the sets", "the score", "the hero", "the villain", "the jokes", "the camera"]


def toy_rows(n: int, seed: int = 0) -> list[dict]:
    """Separable preferences: the chosen answer says "good", the rejected one "bad"."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        subject = rng.choice(SUBJECTS)
        rows.append({"prompt": f"Review {i}:", "chosen": f" {subject} was good", "rejected": f" {subject} was bad"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def toy_rm(tmp_path_factory):
    """A reward model trained once on 48 toy pairs (full fine-tuning of the tiny model, 4 epochs, ~5 s)."""
    root = tmp_path_factory.mktemp("rm")
    data = write_jsonl(root / "prefs.jsonl", toy_rows(48))
    config = RewardModelConfig(base="tiny", lora=False, epochs=4, lr=3e-3, batch_size=8, heldout_fraction=0.25)
    info = train_reward_model(data, root / "rm", config, seed=0, prompt_format="plain", quiet=True)
    return root, info


def test_rm_learns_a_separable_preference_set(toy_rm):
    root, info = toy_rm
    assert info["heldout"]["pairs"] == 12 and info["train"]["pairs"] == 36
    assert info["heldout"]["accuracy"] >= 0.9 and info["train"]["accuracy"] >= 0.9
    assert info["accuracy"] == info["heldout"]["accuracy"]
    assert sum(row["pairs"] for row in info["calibration_table"]) == 12
    saved = json.loads((root / "rm" / "rlhflab_rm.json").read_text())
    assert saved["gain"] == info["gain"] and saved["format"] == "sequence-classification"


def test_normalisation_gives_mean_0_std_1_on_the_calibration_set(toy_rm):
    root, info = toy_rm
    pairs, _ = load_preferences(root / "prefs.jsonl")
    train, _ = split_by_prompt(pairs, 0.25, 0)  # the split train_reward_model used
    reward = load_reward_model(root / "rm")
    prompts = [p.prompt for p in train for _ in "cr"]
    answers = [a for p in train for a in (p.chosen, p.rejected)]
    scores = reward(prompts, answers, [{}] * len(answers))
    assert info["calibration_samples"] == len(answers) == 72
    assert statistics.fmean(scores) == pytest.approx(0.0, abs=1e-4)
    assert statistics.pstdev(scores) == pytest.approx(1.0, abs=1e-4)


def test_rm_dir_loads_as_a_transformers_sequence_classifier(toy_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, info = toy_rm
    rm_dir = root / "rm"
    prompts = ["Review 1:", "Review 2: a much longer prompt than the others", "x"]
    answers = [" the film was good", " the plot was bad, honestly", " ok"]
    ours = load_reward_model(rm_dir)(prompts, answers)
    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    assert type(hf).__name__ == "LlamaForSequenceClassification" and tokenizer.padding_side == "right"
    texts = [p + a + tokenizer.eos_token for p, a in zip(prompts, answers)]  # what the RM reads ("plain" format)
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        logits = hf(**batch).logits[:, 0]
    # documented: normalised score = HF logit + hf_offset (the gain is folded into HF's bias-free `score` layer)
    assert (logits + info["hf_offset"]).tolist() == pytest.approx(ours, abs=1e-4)
    assert info["hf_offset"] == pytest.approx(info["bias"] + info["gain"] * info["head_bias"])


def test_model_spec_is_a_reward(toy_rm, tmp_path):
    root, _ = toy_rm
    reward = build_reward(f"model:{root / 'rm'}")
    assert reward.names == ["reward_model"]
    good, bad = reward(["Review 99:"] * 2, [" the cast was good", " the cast was bad"])
    assert good > bad
    assert build_reward("model:rm", base_dir=root)(["Review 99:"], [" the cast was good"]) == pytest.approx([good])
    with pytest.raises(UserError, match="not a reward model directory"):
        build_reward(f"model:{tmp_path}")


def test_left_padding_gives_the_same_score_as_right_padding(toy_rm):
    root, _ = toy_rm
    reward = load_reward_model(root / "rm")
    texts = reward.texts(["Review 1:", "Review 2: longer"], [" good", " the ending was bad"])
    scores = {}
    for side in ("right", "left"):
        reward.tokenizer.padding_side = side
        enc = reward.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        assert last_real_index(enc["attention_mask"]).tolist() == (
            [enc["attention_mask"].shape[1] - 1] * 2 if side == "left" else (enc["attention_mask"].sum(1) - 1).tolist())
        with torch.no_grad():
            scores[side] = reward.model(enc["input_ids"], enc["attention_mask"]).tolist()
    assert scores["left"] == pytest.approx(scores["right"], abs=1e-5)


def test_calibration_table_by_hand():
    chosen, rejected = torch.tensor([3.0, 0.0, 0.1, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    table = {row["bin"]: row for row in calibration_table(chosen, rejected)}
    # σ(3) = 0.9526 right; σ(−1) → confidence 0.7311 wrong; σ(0.1) → 0.525 right; a tie: 0.5, wrong
    assert table["0.9-1.0"]["pairs"] == 1 and table["0.9-1.0"]["observed"] == 1.0
    assert table["0.7-0.8"]["pairs"] == 1 and table["0.7-0.8"]["observed"] == 0.0
    assert table["0.5-0.6"]["pairs"] == 2 and table["0.5-0.6"]["observed"] == 0.5
    assert table["0.5-0.6"]["predicted"] == pytest.approx((torch.sigmoid(torch.tensor(0.1)).item() + 0.5) / 2)
    assert table["0.6-0.7"]["pairs"] == 0 and table["0.6-0.7"]["predicted"] is None
    assert expected_calibration_error(list(table.values())) == pytest.approx(
        (abs(0.952574 - 1) + abs(0.731059 - 0) + 2 * abs(0.512497 - 0.5)) / 4, abs=1e-5)


def test_preferences_from_a_db_leave_out_ties_skips_and_pending(tmp_path):
    with PreferenceStore(tmp_path / "prefs.db") as store:
        for i, choice in enumerate(["a", "b", "tie", "skip", None]):
            store.add_pair(NewPair(f"p{i}", Candidate(f"A{i}"), Candidate(f"B{i}"), "test", choice=choice,
                                   labeler="x" if choice else None))
    pairs, left_out = load_preferences(tmp_path / "prefs.db")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p0", "A0", "B0"), ("p1", "B1", "A1")]
    assert left_out == {"tie": 1, "skip": 1, "pending": 1}


def test_split_by_prompt_keeps_prompts_on_one_side():
    pairs = [PreferencePair(f"p{i % 7}", f"c{i}", f"r{i}") for i in range(40)]
    train, held = split_by_prompt(pairs, 0.2, seed=3)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert len(train) + len(held) == 40 and 8 <= len(held) < 20
    assert split_by_prompt(pairs, 0.2, seed=3) == (train, held)
    assert split_by_prompt(pairs, 0.0, seed=3) == (pairs, [])


def test_prefs_generate_stores_n_pairs(tmp_path, prompt_file):
    db = tmp_path / "prefs.db"
    result = runner.invoke(app, ["prefs", "generate", "--model", "tiny", "--prompts", str(prompt_file), "--db", str(db),
                                 "--pairs", "6", "--max-new-tokens", "6", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "stored 6 new pairs" in result.output
    with PreferenceStore(db, create=False) as store:
        pairs = store.pairs()
        assert len(pairs) == 6 and store.stats().by_state == {"pending": 6}
    prompts = prompt_file.read_text().splitlines()
    assert [p.prompt.text for p in pairs] == (prompts * 2)[:6]  # the prompt file, cycled
    assert all(p.a.text != p.b.text and p.a.model == "tiny" and p.source == "generate" for p in pairs)
    assert pairs[0].a.sampling == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 6,
                                   "prompt_format": "chat"}


def test_rm_train_cli_with_lora(tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", toy_rows(12))
    out = tmp_path / "rm"
    result = runner.invoke(app, ["rm", "train", "--db", str(data), "--out", str(out), "--base", "tiny",
                                 "--epochs", "1", "--lora-r", "4", "-q"])
    assert result.exit_code == 0, result.output
    assert "heldout: 1 pairs" in result.output and "gain" in result.output
    info = json.loads((out / "rlhflab_rm.json").read_text())
    assert info["settings"]["lora"] is True and info["prompt_format"] == "chat"
    assert not any(out.glob("adapter_*"))  # LoRA merged: a plain model directory
    again = runner.invoke(app, ["rm", "train", "--db", str(data), "--out", str(out), "--base", "tiny", "-q"])
    assert again.exit_code == 2 and "already exists" in again.output


def test_architectures_without_a_sequence_classifier_save_a_causal_lm_and_a_head(tmp_path, monkeypatch):
    import rlhflab.rewards.reward_model as rm

    monkeypatch.setattr(rm, "_as_sequence_classifier", lambda lm, pad_token_id: None)
    data = write_jsonl(tmp_path / "prefs.jsonl", toy_rows(8))
    config = RewardModelConfig(base="tiny", lora=False, epochs=1, lr=1e-3, heldout_fraction=0.0)
    info = train_reward_model(data, tmp_path / "rm", config, prompt_format="plain", quiet=True)
    assert info["format"] == "causal-lm+head" and (tmp_path / "rm" / "rm_head.safetensors").is_file()
    rows = toy_rows(8)
    prompts = [r["prompt"] for r in rows for _ in "cr"]
    answers = [a for r in rows for a in (r["chosen"], r["rejected"])]
    scores = load_reward_model(tmp_path / "rm")(prompts, answers)
    assert statistics.fmean(scores) == pytest.approx(0.0, abs=1e-4)
    assert statistics.pstdev(scores) == pytest.approx(1.0, abs=1e-4)


def test_critic_starts_as_the_reward_model(toy_rm, tmp_path):
    """model.critic_init: the critic's value at an answer's last token is the RM's normalised score of it."""
    from rlhflab.config import Config
    from rlhflab.ppo.rollout import Generation
    from rlhflab.ppo.trainer import PPOTrainer

    root, _ = toy_rm
    prompts = tmp_path / "p.txt"
    prompts.write_text("Review 1:\nReview 2:\n")
    config = Config.model_validate({
        # fp32 like the RM: under bf16 autocast the critic's values would match it only to ~1e-2
        "model": {"name": "tiny", "prompt_format": "plain", "critic_init": str(root / "rm"), "dtype": "float32"},
        "data": {"prompts": str(prompts)}, "rollout": {"prompts_per_iteration": 2, "max_new_tokens": 4},
        "ppo": {"minibatch_size": 2}, "reward": {"spec": "length"}, "eval": {"report": False},
    })
    trainer = PPOTrainer(config, tmp_path / "run")
    rm = load_reward_model(root / "rm")
    answers = [" the cast was good", " the cast was bad"]
    tok = trainer.tokenizer
    tok.padding_side = "left"
    q = tok(["Review 9:"] * 2, return_tensors="pt", add_special_tokens=False)
    tok.padding_side = "right"
    r = tok([a + tok.eos_token for a in answers], return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "left"
    mask = r.attention_mask.float()
    gen = Generation(q.input_ids, q.attention_mask, r.input_ids, mask, torch.ones(2, dtype=torch.bool),
                     None, None, None, answers)
    values = trainer._score_forwards(gen)[1]
    last = mask.sum(1).long() - 1
    # V at the EOS position predicts from the text before the EOS; the RM reads the EOS itself
    v_before_eos = values[torch.arange(2), last]
    enc = rm.tokenizer(["Review 9:" + a for a in answers], return_tensors="pt", padding=True, add_special_tokens=False)
    scores = rm.model(enc["input_ids"], enc["attention_mask"])
    assert torch.allclose(v_before_eos, scores, atol=1e-4)
    assert v_before_eos[0] > v_before_eos[1]  # it already prefers "good"
    bad = config.model_copy(update={"model": config.model.model_copy(update={"critic": "shared"})})
    with pytest.raises(ValueError, match="critic_init"):
        Config.model_validate(bad.model_dump())
