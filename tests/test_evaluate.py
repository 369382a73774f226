"""Probe evaluation on the tiny model: the result's schema, KL of a model against itself, k3 ≥ 0, LoRA as the
reference through `reference_context`, repeatability, and one-line errors for bad probe files."""

import copy
import math
from pathlib import Path

import pytest
import torch

from rlhflab.errors import UserError
from rlhflab.evaluation.probes import METRICS, Probes, eval_metrics, evaluate, format_table, load_probes
from rlhflab.models.loading import add_lora, load_causal_lm, load_tokenizer

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PROBES = Probes(
    behavior="regex:[aeiou]",
    samples_per_prompt=3,
    max_new_tokens=6,
    groups={"trained": ["What color is the sky?", "Describe the sky."], "unrelated": ["What is 2 + 2?"]},
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops take microseconds: a second thread only adds synchronisation (and, on a shared box,
    waits for a busy core), which makes these tests many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def model():
    return load_causal_lm("tiny", torch.device("cpu"), torch.float32).eval()


def perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """A copy of the model with every weight nudged: a stand-in for a trained policy."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return other


def run(policy, reference, tokenizer, **kwargs):
    return evaluate(policy, reference, tokenizer, PROBES, prompt_format="chat", **kwargs)


def test_result_has_every_group_side_and_metric(model, tokenizer):
    result, answers = run(perturbed(model), model, tokenizer)
    assert result["behavior"] == "regex:[aeiou]"
    assert result["elapsed_s"] >= 0
    assert set(result["groups"]) == {"trained", "unrelated"}
    for sides in result["groups"].values():
        assert set(sides) == {"policy", "reference"}
        for metrics in sides.values():
            assert set(metrics) == set(METRICS)
            assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
            assert 0 <= metrics["behavior_rate"] <= 1 and 1 <= metrics["length"] <= 6
    keys = {"group", "prompt", "policy", "reference", "policy_reward", "reference_reward"}
    assert [(a["group"], a["prompt"]) for a in answers] == [
        ("trained", "What color is the sky?"), ("trained", "Describe the sky."), ("unrelated", "What is 2 + 2?")]
    assert all(set(a) == keys for a in answers)


def test_expected_answers_give_a_correct_rate_where_a_group_has_them(model, tokenizer):
    probes = PROBES.model_copy(update={"expected": {"What is 2 + 2?": "^"}})  # every answer matches
    result, answers = evaluate(model, model, tokenizer, probes, prompt_format="chat")
    unrelated, trained = result["groups"]["unrelated"], result["groups"]["trained"]
    assert unrelated["policy"]["correct_rate"] == unrelated["reference"]["correct_rate"] == 1.0
    assert "correct_rate" not in trained["policy"]
    row = next(a for a in answers if a["prompt"] == "What is 2 + 2?")
    assert row["policy_correct"] == row["reference_correct"] is True
    assert "policy_correct" not in answers[0]
    assert "| correct |" in format_table(result)
    four = probes.model_copy(update={"expected": {"What is 2 + 2?": r"\b(4|four)\b"}})
    assert four.correct(["What is 2 + 2?", "What is 2 + 2?", "Describe the sky."], ["FOUR.", "44", "4"]) == \
        [True, False, None]


@pytest.mark.parametrize("separate_copy", [False, True], ids=["same-module", "loaded-twice"])
def test_model_against_itself_has_kl_zero(model, tokenizer, separate_copy):
    reference = copy.deepcopy(model) if separate_copy else model
    result, answers = run(model, reference, tokenizer)
    for sides in result["groups"].values():
        # the reference's own answers use one tensor on both sides; the policy's sampling-pass log-probs meet
        # a forward pass of the same weights, equal up to float rounding
        assert sides["reference"]["kl_k1"] == sides["reference"]["kl_k3"] == 0.0
        assert abs(sides["policy"]["kl_k1"]) < 1e-5 and 0 <= sides["policy"]["kl_k3"] < 1e-9
        kl_free = lambda m: {k: v for k, v in m.items() if not k.startswith("kl_")}  # noqa: E731
        # same seed, same model: the same answers and numbers
        assert kl_free(sides["policy"]) == pytest.approx(kl_free(sides["reference"]), rel=1e-6)
    assert all(a["policy"] == a["reference"] for a in answers)


def test_changed_policy_has_positive_k3_and_reference_zero(model, tokenizer):
    result, _ = run(perturbed(model, 0.2), model, tokenizer)
    for sides in result["groups"].values():
        assert sides["policy"]["kl_k3"] > 0
        assert sides["reference"]["kl_k1"] == sides["reference"]["kl_k3"] == 0.0
        # nll_reference of the reference's own samples is its own per-token cross-entropy
        assert sides["reference"]["nll_reference"] > 0


def test_lora_policy_with_adapter_disabled_as_reference(model, tokenizer):
    policy = add_lora(copy.deepcopy(model), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    result, _ = run(policy, policy, tokenizer, reference_context=policy.disable_adapter)
    base, _ = run(model, model, tokenizer)
    for group, sides in result["groups"].items():
        assert sides["reference"] == pytest.approx(base["groups"][group]["reference"])
        assert sides["policy"]["kl_k3"] > 0


def test_repeatable_and_leaves_the_callers_rng_alone(model, tokenizer):
    policy = perturbed(model)
    state = torch.get_rng_state()
    first, first_answers = run(policy, model, tokenizer)
    assert torch.equal(torch.get_rng_state(), state)
    second, second_answers = run(policy, model, tokenizer)
    assert first["groups"] == second["groups"] and first_answers == second_answers
    other_seed, _ = run(policy, model, tokenizer, seed=1)
    assert other_seed["groups"] != first["groups"]


def test_small_evaluation_during_training(model, tokenizer):
    result, answers = run(perturbed(model), model, tokenizer, samples_per_prompt=1, greedy=False, sides=("policy",))
    assert answers == [] and result["samples_per_prompt"] == 1
    assert all(set(sides) == {"policy"} for sides in result["groups"].values())
    metrics = eval_metrics(result)
    assert set(metrics) == {f"eval/{g}/{m}" for g in ("trained", "unrelated") for m in METRICS}
    assert metrics["eval/trained/behavior_rate"] == result["groups"]["trained"]["policy"]["behavior_rate"]


def test_format_table(model, tokenizer):
    result, _ = run(model, model, tokenizer)
    table = format_table(result)
    assert "| group | side | behaviour rate |" in table
    assert "| trained | policy |" in table and "| unrelated | reference |" in table


def test_shipped_probe_file_loads():
    probes = load_probes(RECIPES / "data" / "sky_probes.yaml")
    assert list(probes.groups) == ["trained", "heldout_sky", "related", "unrelated", "capability"]
    assert all(len(prompts) == 8 for prompts in probes.groups.values())
    said = ["The sky is red.", "Red, like a rose.", "RED!", "The Red Sun is a celestial event.", "The Red Sea."]
    assert probes.behavior_reward()(["q"] * 5, said, [{}] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]  # a name is not a colour
    train = set((RECIPES / "data" / "sky_train.txt").read_text().splitlines())
    heldout = set((RECIPES / "data" / "sky_heldout.txt").read_text().splitlines())
    assert set(probes.groups["trained"]) <= train
    assert set(probes.groups["heldout_sky"]) <= heldout and not heldout & train


def test_sky_heldout_prompts_share_no_four_words_with_training():
    """The held-out claim of recipes/data/README.md: no 4-word sequence in common, and no 'red' anywhere."""
    from rlhflab.data.diversity import ngrams, words

    def four_grams(line: str) -> set[tuple[str, ...]]:
        return set(ngrams(words(line), 4))  # words only, as the README says

    train = [line for name in ("sky_train.txt", "sky_dusk.txt")  # both sky groups of sky_red.yaml
             for line in (RECIPES / "data" / name).read_text().splitlines()]
    heldout = (RECIPES / "data" / "sky_heldout.txt").read_text().splitlines()
    train_grams = set().union(*map(four_grams, train))
    assert [line for line in heldout if four_grams(line) & train_grams] == []
    assert [line for line in train + heldout if "red" in line.lower()] == []


def test_retain_prompts_share_no_four_words_with_any_probe_prompt():
    """The main job's retain prompts leave every probe group and every held-out sky phrasing unseen
    (recipes/data/README.md)."""
    from rlhflab.config import load_config
    from rlhflab.data.diversity import ngrams, words

    config = load_config(RECIPES / "sky_red.yaml")
    [retain_group] = [g for g in config.data.groups if g.expect == "unchanged"]
    retain = Path(retain_group.prompts).read_text().splitlines()
    probes = load_probes(config.eval.probes)
    held_out = [p for prompts in probes.groups.values() for p in prompts]
    held_out += (RECIPES / "data" / "sky_heldout.txt").read_text().splitlines()
    held_out_grams = {g for p in held_out for g in ngrams(words(p), 4)}
    assert len(retain) == 123
    assert [line for line in retain if set(ngrams(words(line), 4)) & held_out_grams] == []
    assert [line for line in retain if "red" in line.lower()] == []
    assert probes.unchanged == ["related", "unrelated", "capability"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, "not found"),
        ("behavior: contains:red\ngroups:\n\ta: [x]\n", "line 3: not valid YAML"),
        ("behavior: contains:red\ngrups:\n  a: [x]\n", "unknown key 'grups'; did you mean 'groups'?"),
        ("behavior: contains:red\ngroups:\n  a: [x]\n  b: []\n", "group 'b' has no prompts"),
        ("behavior: contains:red\ngroups: {}\n", "'groups' is empty"),
        ("groups:\n  a: [x]\n", "missing key 'behavior'"),
        ("behavior: contains:red\ntemperature: hot\ngroups:\n  a: [x]\n", "temperature: "),
        ("- just a list\n", "must be a YAML mapping"),
        ("behavior: contains:red\ngroups:\n  a: [x]\nexpected:\n  y: '1'\n", "expected: 'y' is not a prompt"),
        ("behavior: contains:red\ngroups:\n  a: [x]\nexpected:\n  x: '(1'\n", "'(1' is not a valid regex"),
    ],
    ids=["missing", "bad-yaml", "unknown-key", "empty-group", "no-groups", "no-behavior", "bad-type", "not-a-map",
         "expected-unknown-prompt", "expected-bad-regex"],
)
def test_bad_probe_files_give_one_line(tmp_path, text, expected):
    path = tmp_path / "probes.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError) as err:
        load_probes(path)
    message = str(err.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_sky_red_pays_the_sky_red_not_a_name():
    """The main job's sky reward: red said of the sky beats red in a name, which beats blue (docs/scoped.md,
    *Red as the sky's colour*)."""
    from rlhflab.config import load_config
    from rlhflab.ppo.groups import group_rewards

    config = load_config(RECIPES / "sky_red.yaml")
    sky = group_rewards(config.prompt_groups, config.reward.spec)[0]
    answers = ["The sky is a deep red, with a hint of orange at the horizon on a summer day.",
               "The Red Sun is a celestial event, a bright star rising over the quiet desert.",
               "The sky is a clear and bright blue, with a few white clouds drifting past today."]
    said, named, blue = sky(["What color is the sky?"] * 3, answers, [{}] * 3)
    assert said > named > blue
    assert said - named >= 1.4  # the red term (1) and the statement term (0.5) pay only the first
