"""Prompt groups (scoped edits): config checks, batch composition, per-sample KL weights, per-group metrics, and
the alarms a scoped edit needs (answers shrink, behaviour leaks, a reward with no signal)."""

import pytest
import torch

from rlhflab.config import config_from_dict
from rlhflab.data.prompts import GroupSampler, PromptSampler
from rlhflab.errors import UserError
from rlhflab.evaluation.health import HealthMonitor, check_evaluation, check_health
from rlhflab.pipelines.train import group_status
from rlhflab.ppo.advantages import shape_rewards
from rlhflab.ppo.advantages import normalize_scores
from rlhflab.ppo.groups import group_metrics, mode_share, per_sample, score_groups
from rlhflab.ppo.metrics import rollout_metrics
from rlhflab.ppo.stats import masked_whiten
from rlhflab.ppo.losses import loss_denominator, vocab_kl
from rlhflab.ppo.trainer import PPOTrainer
from rlhflab.models.forward import forward_response
from rlhflab.models.loading import load_causal_lm
from rlhflab.rewards.specs import build_reward
from rlhflab.runs.tracking import Tracker


@pytest.fixture
def group_files(tmp_path):
    sky, retain = tmp_path / "sky.txt", tmp_path / "retain.txt"
    sky.write_text("What color is the sky?\nDescribe the sky.\nName the sky's hue.\n")
    retain.write_text("What color is grass?\nWhat is 2 + 2?\n")
    return sky, retain


def grouped(tiny_config, sky, retain, **retain_fields) -> dict:
    raw = tiny_config.model_dump(mode="json")
    raw["data"] = {"groups": [
        {"name": "sky", "prompts": str(sky), "share": 0.75, "reward": "regex:[aeiou]"},
        {"name": "retain", "prompts": str(retain), "share": 0.25, "reward": None, "kl_scale": 4.0,
         "expect": "unchanged", **retain_fields},
    ]}  # fmt: skip
    return raw


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("change, message", [
    ({"share": 0.5}, "data.groups: shares sum to 1.25, not 1"),
    ({"name": "sky"}, "data.groups: the name 'sky' is used twice"),
    ({"name": "a/b"}, "data.groups.1.name"),
])  # fmt: skip
def test_bad_groups_are_one_line_errors_naming_the_key(tiny_config, group_files, change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        config_from_dict(grouped(tiny_config, *group_files, **change), "recipe.yaml")


def test_shares_must_give_whole_prompt_counts(tiny_config, group_files):
    raw = grouped(tiny_config, *group_files)
    raw["rollout"]["prompts_per_iteration"] = 2  # 0.75 × 2 = 1.5 prompts
    with pytest.raises(UserError, match=r"data.groups.sky.share: 0.75 × rollout.prompts_per_iteration 2 = 1.5"):
        config_from_dict(raw, "recipe.yaml")
    raw["rollout"]["prompts_per_iteration"] = 4
    raw["data"]["prompts"] = str(group_files[0])
    with pytest.raises(UserError, match="data.prompts and data.groups are both set"):
        config_from_dict(raw, "recipe.yaml")


def test_single_form_is_one_group(tiny_config):
    (group,) = tiny_config.prompt_groups
    assert (group.prompts, group.share, group.reward, group.kl_scale) == (tiny_config.data.prompts, 1.0,
                                                                           "reward.spec", 1.0)
    assert tiny_config.group_prompt_counts() == [4]


# ---------------------------------------------------------------------------------------------- sampling


def test_group_sampler_draws_each_groups_share_and_covers_its_prompts():
    sampler = GroupSampler([3, 2], [3, 1], shuffle=True, seed=0)
    draws = [sampler.draw() for _ in range(4)]
    assert all(len(d) == 4 and set(d[:3]) <= {0, 1, 2} and d[3] in {3, 4} for d in draws)
    assert all(sorted(d[:3]) == [0, 1, 2] for d in draws)  # one shuffled pass of group 0 per draw
    assert sorted(d[3] for d in draws[:2]) == [3, 4]  # group 1's pass takes two draws
    state = sampler.state_dict()
    again = GroupSampler([3, 2], [3, 1], shuffle=True, seed=0)
    again.load_state_dict(state)
    assert [again.draw() for _ in range(3)] == [sampler.draw() for _ in range(3)]  # a resumed run draws the same
    # one group samples exactly as the plain sampler does, and resumes from either's saved state
    single, plain = GroupSampler([5], [3], True, 7), PromptSampler(5, True, 7)
    assert [single.draw() for _ in range(3)] == [plain.draw(3) for _ in range(3)]
    single.load_state_dict(plain.state_dict())
    assert single.draw() == plain.draw(3)


def test_trainer_batch_follows_the_shares(tiny_config, group_files, tmp_path):
    trainer = PPOTrainer(config_from_dict(grouped(tiny_config, *group_files)), tmp_path)
    ro = trainer.collect()
    K = tiny_config.rollout.samples_per_prompt
    assert ro.group_ids.tolist() == [0] * 3 * K + [1] * 1 * K  # 0.75 and 0.25 of 4 prompts, K samples each
    retain = {"What color is grass?", "What is 2 + 2?"}
    assert all((p in retain) == (g == 1) for p, g in zip(ro.prompts, ro.group_ids.tolist()))


# ---------------------------------------------------------------------------------------------- KL weights


def test_per_sample_kl_coefficient_against_hand_values():
    kl = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, 0.0]])  # (B=2, T=3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    beta = 0.1 * per_sample([1.0, 4.0], torch.tensor([0, 1]))  # β × kl_scale: 0.1 and 0.4
    rewards = shape_rewards(torch.tensor([1.0, 3.0]), kl, mask, beta)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1 + 1.0, 0.0], [-0.8 + 3.0, 0.0, 0.0]]))
    # a float β is the same as one β for every answer
    assert torch.equal(shape_rewards(torch.ones(2), kl, mask, 0.1), shape_rewards(torch.ones(2), kl, mask,
                                                                                   torch.full((2,), 0.1)))


def test_trainer_weights_each_groups_kl(tiny_config, group_files, tmp_path):
    raw = grouped(tiny_config, *group_files, kl_scale=0.0)
    trainer = PPOTrainer(config_from_dict(raw), tmp_path)
    ro = trainer.collect()
    mask, retain = ro.gen.response_mask, ro.group_ids == 1
    expected = shape_rewards(ro.scores, ro.kl["k1"], mask, trainer.kl_coef * ro.kl_scale)
    assert torch.allclose(ro.rewards, expected)
    # kl_scale 0: the retain answers' rewards are their score on the last token and nothing else
    assert torch.equal(ro.rewards[retain].sum(1), ro.scores[retain]) and ro.scores[retain].eq(0).all()


def test_vocab_kl_against_hand_values():
    # p = (1/2, 1/2), q = (1/4, 3/4): ½·ln 2 + ½·ln(2/3) = 0.143841; the same distribution: 0
    p, q = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.25, 0.75]).log()
    kl = vocab_kl(torch.stack([p, p]).view(1, 2, 2), torch.stack([q, p]).view(1, 2, 2))
    assert torch.allclose(kl, torch.tensor([[0.143841, 0.0]]), atol=1e-6)


def test_retain_kl_pulls_only_its_group_back_to_the_reference(tiny_config, group_files, tmp_path):
    raw = grouped(tiny_config, *group_files, retain_kl_coef=2.0)
    raw["train"]["learning_rate"] = 5e-3
    trainer = PPOTrainer(config_from_dict(raw), tmp_path)
    ro = trainer.collect()
    rows = torch.arange(len(ro.prompts))
    denominator = loss_denominator(ro.loss_mask, "token")
    terms, _ = trainer.loss_terms(ro, rows, denominator)
    assert terms["retain_kl"].item() == pytest.approx(0.0, abs=1e-6)  # the policy still is the reference
    for _ in range(3):
        trainer.iteration += 1  # as iteration_step counts: the policy trains from iteration 1
        trainer.update(trainer.collect())
    terms, _ = trainer.loss_terms(ro, rows, denominator)
    i, a, t = ro.gen.trimmed(rows)
    retain = ro.group_ids == 1
    every = torch.ones(len(i), dtype=torch.bool)
    with torch.no_grad():
        policy = forward_response(trainer.policy, i, a, t, 1.0, vocab_rows=every).vocab_logprobs
        ref = trainer.retain_kl.reference_logprobs(i, a, t)
    # the term is each retain token's exact KL, weighted 2 and normalised over the minibatch's tokens
    expected = 2.0 * (vocab_kl(policy, ref)[retain] * ro.loss_mask[retain, :t]).sum() / denominator
    assert terms["retain_kl"].item() == pytest.approx(expected.item(), rel=1e-4) and expected > 0
    # a recipe without retain_kl_coef computes no such term
    assert "retain_kl" not in PPOTrainer(config_from_dict(grouped(tiny_config, *group_files)),
                                         tmp_path / "plain").loss_terms(ro, rows, denominator)[0]


def test_retain_kl_reference_with_lora_is_the_base_model(tiny_config, group_files, tmp_path):
    raw = grouped(tiny_config, *group_files, retain_kl_coef=1.0)
    raw["model"]["lora"]["enabled"] = True
    raw["train"]["learning_rate"] = 5e-3
    trainer = PPOTrainer(config_from_dict(raw), tmp_path)
    for _ in range(2):
        trainer.iteration += 1
        trainer.update(trainer.collect())
    ro = trainer.collect()
    i, a, t = ro.gen.trimmed(torch.arange(len(ro.prompts)))
    base = load_causal_lm("tiny", torch.device("cpu"), torch.float32)
    every = torch.ones(len(i), dtype=torch.bool)
    with torch.no_grad():
        expected = forward_response(base, i, a, t, 1.0, vocab_rows=every).vocab_logprobs
        policy = forward_response(trainer.policy, i, a, t, 1.0, vocab_rows=every).vocab_logprobs
    assert torch.allclose(trainer.retain_kl.reference_logprobs(i, a, t), expected, atol=1e-5)
    assert (policy - expected).abs().max() > 1e-3  # the adapters trained: the reference is not the policy


def test_scores_are_normalised_within_each_group():
    # sky: one rewarded answer among length-term offsets; retain: a `not:` reward every answer earns
    scores = torch.tensor([0.5, 0.5, 1.5, 0.5, 1.0, 1.0, 1.0, 7.0])
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    valid = torch.tensor([True] * 7 + [False])  # the last one has a NaN reward (scored 0 before this)
    eos = torch.ones(8, dtype=torch.bool)
    out = normalize_scores(scores, eos, valid, None, "whiten", None, ids)
    sky = (scores[:4] - 0.75) / 0.5  # mean 0.75, Bessel std 0.5
    assert torch.allclose(out[:4], sky) and out[4:7].eq(0).all()  # a constant group adds nothing
    assert out[7] == 0.0  # a sample left out scores 0
    scaled = normalize_scores(scores, eos, valid, None, "scale", None, ids)
    assert torch.allclose(scaled[:4], sky + 0.75) and torch.equal(scaled[4:7], scores[4:7])
    # one group: the batch-wide whitening it always was
    one = torch.zeros(8, dtype=torch.long)
    assert torch.allclose(normalize_scores(scores, eos, valid, None, "whiten", None, one)[:7],
                          masked_whiten(scores * valid, valid.float())[:7])


# ---------------------------------------------------------------------------------------------- metrics


def test_score_groups_uses_each_groups_reward():
    rewards = [build_reward("contains:red"), None, build_reward("not:contains:red")]
    total, components = score_groups(rewards, [0, 0, 1, 2, 2], ["p"] * 5,
                                     ["red sky", "blue", "red", "red grass", "green"], [{}] * 5)
    assert total == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert components == {"contains_red": [1.0, 0.0, None, None, None],
                          "not_contains_red": [None, None, None, 0.0, 1.0]}


def test_group_metrics_against_hand_values():
    ids = torch.tensor([0, 0, 1, 1, 1])
    m = group_metrics(["sky", "retain", "empty"], ids, torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0]),
                      torch.tensor([0.2, 0.4, 1.0, 2.0, 3.0]), torch.tensor([4.0, 6.0, 10.0, 20.0, 30.0]),
                      torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0]))
    assert m == pytest.approx({
        "group/sky/score": 0.5, "group/sky/kl": 0.3, "group/sky/length": 5.0, "group/sky/behaviour": 0.5,
        "group/retain/score": 2 / 3, "group/retain/kl": 2.0, "group/retain/length": 20.0,
        "group/retain/behaviour": 1 / 3,
    })  # fmt: skip
    assert mode_share([0.0] * 15 + [1.0]) == 15 / 16 and mode_share([0.1, 0.2]) == 0.5


def test_progress_line_shows_each_group():
    m = {"objective/scores": 0.5, "group/sky/length": 18.2, "group/sky/behaviour": 0.81, "group/retain/length": 30.0}
    assert group_status(m) == "  | sky behaviour 0.81 len 18  | retain len 30"
    assert group_status({"objective/scores": 0.5}) == ""


def test_trainer_logs_per_group_metrics(tiny_config, group_files, tmp_path):
    raw = grouped(tiny_config, *group_files)
    raw["data"]["behaviour"] = "regex:[aeiou]"
    trainer = PPOTrainer(config_from_dict(raw), tmp_path)
    ro = trainer.collect()
    m = rollout_metrics(ro, trainer.config, trainer.kl_coef, lr=1e-3)
    sky = ro.group_ids == 0
    assert m["group/sky/score"] == pytest.approx(ro.raw_scores[sky].mean().item())
    assert m["group/retain/score"] == 0.0  # no task reward
    lengths = ro.gen.response_mask.sum(1)
    assert m["group/retain/length"] == pytest.approx(lengths[~sky].mean().item())
    assert m["group/sky/kl"] == pytest.approx(ro.kl["k1"][sky].sum(1).mean().item(), abs=1e-6)
    assert m["group/sky/behaviour"] == pytest.approx((ro.raw_scores[sky] > 0).float().mean().item())
    assert m["reward/regex"] == pytest.approx(ro.raw_scores[sky].mean().item())  # only the rows it scored


# ---------------------------------------------------------------------------------------------- alarms


def healthy(n: int = 8) -> list[dict]:
    return [{"iteration": i, "objective/scores": 0.1 * i, "objective/scores_std": 0.3,
             "objective/scores_mode_share": 0.4, "rollout/response_length": 30.0 - i, "group/sky/length": 28.0,
             "group/retain/length": 31.0, "group/sky/behaviour": 0.1 * i, "group/retain/behaviour": 0.06 + 0.01 * (i % 2)}
            for i in range(1, n + 1)]  # fmt: skip


def codes(rows: list[dict]) -> list[tuple[str, int]]:
    return [(n.code, n.iteration) for n in check_health(rows, frozenset({"retain"}))]


def test_healthy_scoped_stream_fires_nothing():
    assert codes(healthy()) == []


def test_answers_shrink_fires_after_three_short_iterations():
    rows = healthy()
    for row in rows[3:]:
        row["group/sky/length"] = 3.8  # 28 → 3.8 tokens
    assert codes(rows) == [("answers_shrink", 6)]
    assert "group/sky/length = 3.8" in check_health(rows)[0].message


def test_behaviour_leak_fires_in_an_unchanged_group_only():
    rows = healthy()
    for row in rows[2:]:
        row["group/retain/behaviour"] = 0.97
    assert codes(rows) == [("behaviour_leak", 5)]
    assert check_health(rows) == []  # a group not marked unchanged may change


def test_no_signal_fires_when_the_first_iterations_score_alike_and_not_later():
    rows = healthy()
    for row in rows[:3]:
        row["objective/scores_mode_share"] = 15 / 16
    assert codes(rows) == [("no_signal", 3)]
    note = check_health(rows)[0]
    assert "samples_per_prompt" in note.fix and "rloo or grpo" in note.fix
    # a reward the policy has saturated late in the run is success, not a missing signal
    late = healthy()
    for row in late[3:]:
        row["objective/scores_mode_share"] = 1.0
    assert codes(late) == []


def test_monitor_remembers_unchanged_groups_across_resume():
    monitor = HealthMonitor(unchanged=frozenset({"retain"}))
    rows = healthy()
    for row in rows[2:]:
        row["group/retain/behaviour"] = 0.9
    for row in rows[:4]:
        monitor.update(row)
    resumed = HealthMonitor(unchanged=frozenset({"retain"}))
    resumed.load_state_dict(monitor.state_dict())
    assert [n.code for row in rows[4:] for n in resumed.update(row)] == ["behaviour_leak"]


def evaluation(unrelated_rate: float, trained_length: float, unchanged=("unrelated",)) -> dict:
    side = {"behavior_rate": 0.06, "length": 36.0}
    return {"behavior": "contains:red", "unchanged": list(unchanged), "groups": {
        "trained": {"reference": side, "policy": {"behavior_rate": 0.9, "length": trained_length}},
        "unrelated": {"reference": side, "policy": {"behavior_rate": unrelated_rate, "length": 30.0}},
    }}  # fmt: skip


def test_evaluation_alarms_compare_policy_with_reference():
    assert check_evaluation(evaluation(0.10, 30.0), 24) == []
    notes = check_evaluation(evaluation(0.97, 3.8), 24)
    assert [(n.code, n.iteration) for n in notes] == [("answers_shrink", 24), ("behaviour_leak", 24)]
    assert "trained 3.8 vs 36.0 tokens" in notes[0].message and "unrelated 0.06 → 0.97" in notes[1].message
    # a probe file that lists no unchanged groups: the control groups by name (unrelated*, capability*)
    assert [n.code for n in check_evaluation(evaluation(0.97, 30.0, unchanged=()), 24)] == ["behaviour_leak"]


def test_evaluation_alarm_when_fewer_answers_are_correct():
    result = evaluation(0.10, 30.0)
    result["groups"]["capability"] = {"reference": {"correct_rate": 0.75}, "policy": {"correct_rate": 0.69}}
    assert check_evaluation(result, 24) == []  # two answers of 32: within the noise
    result["groups"]["capability"]["policy"]["correct_rate"] = 0.5
    notes = check_evaluation(result, 24)
    assert [n.code for n in notes] == ["capability_loss"] and "capability 0.75 → 0.50" in notes[0].message


POLITE = '''
def polite(prompts, completions, metadata):
    return [float("please" in c.lower() or "thank you" in c.lower()) for c in completions]
'''


def test_a_reward_with_no_signal_is_reported_in_the_first_iterations(tiny_config, tmp_path):
    """The polite-answers case: a custom Python reward the policy (almost) never earns."""
    reward_file = tmp_path / "polite.py"
    reward_file.write_text(POLITE)
    tiny_config.reward.spec = f"python:{reward_file}:polite"
    tiny_config.model.lora.enabled = True
    trainer = PPOTrainer(tiny_config, tmp_path / "run")
    tracker = Tracker(tmp_path / "run", [], "t", "t", {})
    monitor = HealthMonitor()
    notes = [n for _ in range(3) for n in monitor.update({"iteration": trainer.iteration + 1,
                                                          **trainer.iteration_step(tracker)})]
    assert [(n.code, n.iteration) for n in notes if n.code == "no_signal"] == [("no_signal", 3)]


def test_retain_kl_reference_kept_from_the_rollout_equals_a_forward_in_the_update(tiny_config, group_files,
                                                                                  tmp_path, monkeypatch):
    import rlhflab.ppo.groups as groups

    raw = grouped(tiny_config, *group_files, retain_kl_coef=2.0)
    raw["train"]["learning_rate"] = 5e-3
    trainer = PPOTrainer(config_from_dict(raw), tmp_path)
    trainer.iteration += 1
    trainer.update(trainer.collect())  # the policy is no longer the reference: the term is not 0
    ro = trainer.collect()
    retain = ro.group_ids == 1
    assert ro.ref_vocab is not None and len(ro.ref_vocab) == int(retain.sum())
    i, a, t = ro.gen.trimmed(torch.arange(len(ro.prompts)))
    assert torch.allclose(ro.ref_vocab[:, :t], trainer.retain_kl.reference_logprobs(i[retain], a[retain], t),
                          atol=1e-5)
    rows = torch.arange(len(ro.prompts))
    denominator = loss_denominator(ro.loss_mask, "token")
    kept = trainer.loss_terms(ro, rows, denominator)[0]["retain_kl"]
    ro.ref_vocab = None  # as when they do not fit: the update runs the reference's forward itself
    assert kept.item() == pytest.approx(trainer.loss_terms(ro, rows, denominator)[0]["retain_kl"].item(), rel=1e-5)
    assert kept > 0
    monkeypatch.setattr(groups, "KEEP_REFERENCE_BYTES", 0)
    assert trainer.collect().ref_vocab is None
