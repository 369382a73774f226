"""Reward specs: hand-computed values for each kind, the weighted composite, and every error path."""

import math

import pytest
import yaml

from rlhflab.errors import UserError
from rlhflab.rewards.specs import Reward, build_reward, format_score, length_score, lexicon_score, relevance_score


def score_one(spec, completion, prompt="", **kwargs):
    return build_reward(spec, **kwargs)([prompt], [completion], [{}])[0]


# ---- contains / regex --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, text, expected",
    [
        ("contains:red", "The sky is red.", 1.0),
        ("contains:red", "RED-hot coals", 1.0),  # case-insensitive, hyphen is a boundary
        ("contains:red", "I considered it", 0.0),
        ("contains:red", "a powered drill", 0.0),
        ("contains:red:substring", "I considered it", 1.0),
        ("contains:red:substring", "a powered drill", 1.0),
        ("contains:red:case", "RED alert", 0.0),
        ("contains:Red:case", "Red alert", 1.0),
        ("contains:red:substring:case", "poweRED", 0.0),
        ("contains:red:case:substring", "powered", 1.0),
    ],
)
def test_contains(spec, text, expected):
    assert score_one(spec, text) == expected


def test_regex_takes_everything_after_the_first_colon():
    reward = build_reward(r"regex:^\d{2}:\d{2}$")
    assert reward(["", ""], ["12:30", "12-30"], [{}, {}]) == [1.0, 0.0]
    assert reward.names == ["regex"]


# ---- length / relevance / format / lexicon -------------------------------------------------------------


@pytest.mark.parametrize(
    "words, expected",
    [(0, 0.0), (5, 0.5), (10, 1.0), (15, 1.0), (20, 1.0), (25, 0.75), (40, 0.0), (60, 0.0)],
)
def test_length_boundaries(words, expected):
    text = " ".join(["w"] * words)
    assert length_score(text, 10, 20) == pytest.approx(expected)
    assert score_one("length:10:20", text) == pytest.approx(expected)


def test_length_default_is_50_to_500():
    assert score_one("length", " ".join(["w"] * 25)) == 0.5
    assert score_one("length", " ".join(["w"] * 500)) == 1.0
    assert score_one("length", " ".join(["w"] * 750)) == 0.5


def test_relevance_strips_punctuation_and_function_words():
    # prompt content words: explain, photosynthesis, works ("how" is a function word)
    prompt = "Explain how photosynthesis works."
    assert relevance_score(prompt, "Photosynthesis works by capturing light!") == pytest.approx(2 / 3)
    assert relevance_score(prompt, "I explain: photosynthesis WORKS.") == 1.0
    assert relevance_score(prompt, "How nice.") == 0.0
    assert relevance_score("What is it?", "it is") == pytest.approx(2 / 3)  # only function words: keep all
    assert relevance_score("", "anything") == 0.0
    assert score_one("relevance", "works", prompt=prompt) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The sky is blue. It is clear.\n\nYes.", 1.0),
        (" The sky is blue. It is clear.", 2 / 3),  # leading space ignored; no paragraph break
        ("the sky\n  \nis blue", 1 / 3),  # blank line holding spaces counts
        ("the sky is blue", 0.0),
    ],
)
def test_format(text, expected):
    assert format_score(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("This is good and helpful.", 1 / 5),  # Σ=1, n=5, u=5
        ("This is not good at all.", -0.5 / 6),  # negated positive: -1/2
        ("That was not bad", 0.5 / 4),  # negated negative: +1/2
        ("good good good good good", 5 / 5 * 1 / 5),  # repetition factor 1/5
        ("I love it", 1.0),  # 3/3 = 1
        ("Amazing!", 1.0),  # 3/1 clipped
        ("terrible, awful day", -1.0),  # -5/3 clipped
        ("great but sad", (2 - 1) / 3),
        ("I don't like it", -0.5 / 4),  # contraction kept whole
        ("", 0.0),
    ],
)
def test_lexicon(text, expected):
    assert lexicon_score(text) == pytest.approx(expected)


def test_vader_sign():
    reward = build_reward("vader")
    good, bad = reward(["", ""], ["I love this, it is wonderful!", "This is awful and I hate it."], [{}, {}])
    assert 0 < good <= 1 and -1 <= bad < 0


# ---- python: and callables -------------------------------------------------------------------------------


REWARD_FILE = """
def score(prompts, completions, metadata):
    return [len(c) / 10 for c in completions]

answer = 42
"""


def test_python_from_file_relative_to_base_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my_rewards.py").write_text(REWARD_FILE)
    reward = build_reward("python:sub/my_rewards.py:score", base_dir=tmp_path)
    assert reward.names == ["python_score"]
    assert reward(["p", "p"], ["abcde", ""], [{}, {}]) == [0.5, 0.0]


def test_recipe_reward_paths_resolve_against_the_recipe_not_the_working_directory(tmp_path, monkeypatch):
    """A recipe in a subfolder names `python:rewards.py:score` and `model:rm` next to it; loaded from another
    folder, its specs (and the config.yaml a run saves) hold absolute paths that still work from a third one."""
    from rlhflab.config import config_from_dict, load_config, save_config

    tmp_path = tmp_path.resolve()  # the config holds resolved paths
    recipes = tmp_path / "project" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "rewards.py").write_text(REWARD_FILE)
    (recipes / "prompts.txt").write_text("Hi\n")
    (recipes / "r.yaml").write_text("data: {prompts: prompts.txt}\nreward:\n  spec:\n"
                                    "    - {spec: 'python:rewards.py:score'}\n    - {spec: 'model:rm'}\n"
                                    "    - {spec: 'python:rlhflab_test_reward_mod:score'}\n"
                                    "    - {spec: 'hf-classifier:org/some-model:POSITIVE'}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(recipes / "r.yaml")
    assert [t.spec for t in config.reward.spec] == [
        f"python:{recipes / 'rewards.py'}:score",
        f"model:{recipes / 'rm'}",  # missing: the error will name where the recipe says it is
        "python:rlhflab_test_reward_mod:score",  # a module, not a path
        "hf-classifier:org/some-model:POSITIVE",  # a hub id
    ]
    assert config.data.prompts == str(recipes / "prompts.txt")
    save_config(config, tmp_path / "config.yaml")
    monkeypatch.chdir(tmp_path)
    saved = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert build_reward(saved.reward.spec[0].spec)(["p"], ["abcde"], [{}]) == [0.5]


def test_a_path_typed_relative_to_the_working_directory_still_resolves_there(tmp_path, monkeypatch):
    from rlhflab.config import load_config

    tmp_path = tmp_path.resolve()
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("reward: {spec: vader}\n")
    (tmp_path / "mine.py").write_text(REWARD_FILE)
    monkeypatch.chdir(tmp_path)
    config = load_config(tmp_path / "recipes" / "r.yaml", ["reward.spec=python:mine.py:score"])
    assert config.reward.spec == f"python:{tmp_path / 'mine.py'}:score"


def test_python_from_module_path(tmp_path, monkeypatch):
    (tmp_path / "rlhflab_test_reward_mod.py").write_text(REWARD_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert score_one("python:rlhflab_test_reward_mod:score", "abc") == pytest.approx(0.3)


def test_plain_callable_and_metadata_reach_the_function():
    def target_length(prompts, completions, metadata):
        return [-abs(len(c) - m["target"]) for c, m in zip(completions, metadata)]

    reward = build_reward(target_length)
    assert reward.names == ["target_length"]
    assert reward(["", ""], ["abc", "abcdef"], [{"target": 3}, {"target": 4}]) == [0, -2]


def test_weighted_sum_components_and_duplicate_names():
    reward = build_reward(
        [
            {"spec": "contains:red", "weight": 2.0},
            {"spec": "contains:red:substring", "weight": -1.0, "name": "contains_red"},
            {"spec": "length:2:3", "weight": 0.5, "name": "short"},
            "regex:sky",
        ]
    )
    assert isinstance(reward, Reward)
    assert reward.names == ["contains_red", "contains_red_2", "short", "regex"]
    total, components = reward.score(["q", "q"], ["red sky", "powered"], [{}, {}])
    assert components == {
        "contains_red": [1.0, 0.0],
        "contains_red_2": [1.0, 1.0],
        "short": [1.0, 0.5],
        "regex": [1.0, 0.0],
    }
    assert total == pytest.approx([2 - 1 + 0.5 + 1, 0 - 1 + 0.25 + 0])
    assert reward(["q", "q"], ["red sky", "powered"], [{}, {}]) == total
    assert build_reward(reward) is reward


def test_config_reward_terms_are_accepted():
    from rlhflab.config import RewardTerm

    reward = build_reward([RewardTerm(spec="contains:red", weight=3.0), RewardTerm(spec="length:1:1", name="one")])
    assert reward.names == ["contains_red", "one"]
    assert reward(["q"], ["red"], [{}]) == [4.0]


# ---- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("contans:red", ["'contans:red'", "did you mean 'contains:red'?", "valid kinds: contains, regex"]),
        ("sentiment", ["'sentiment'", "valid kinds"]),
        ("contains", ["'contains'", "contains:WORD"]),
        ("contains:red:exact", ["'contains:red:exact'", "'exact'", "substring"]),
        ("regex:(unclosed", ["'regex:(unclosed'", "invalid regular expression"]),
        ("regex", ["regex:PATTERN"]),
        ("length:10", ["'length:10'", "length:MIN:MAX"]),
        ("length:20:10", ["MIN=20 MAX=10"]),
        ("vader:x", ["'vader:x'", "takes no arguments"]),
        ("python:nofile.py:score", ["'python:nofile.py:score'", "no such file"]),
        ("python:score", ["python:path/to/file.py:function"]),
        ("python:rlhflab_no_such_module:score", ["cannot import module 'rlhflab_no_such_module'"]),
        ("python:math:pi", ["'python:math:pi'", "not a function"]),
        ("python:json:loads", ["python_loads must accept (prompts, completions, metadata)"]),
        ("hf-classifier", ["hf-classifier:PATH_OR_ID"]),
        (42, ["42", "neither a spec string nor a callable"]),
        ([], ["empty"]),
        ([{"spec": "length", "wieght": 2}], ["bad reward entry", "wieght"]),
        ([{"spec": "length", "weight": float("nan")}], ["'length'", "finite"]),
        ([{"spec": "length", "name": ""}], ["'length'", "non-empty"]),
    ],
)
def test_bad_specs_raise_one_line_user_errors(spec, needles, tmp_path):
    with pytest.raises(UserError) as info:
        build_reward(spec, base_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_python_file_errors_name_the_problem(tmp_path):
    (tmp_path / "r.py").write_text(REWARD_FILE)
    (tmp_path / "broken.py").write_text("import nonexistent_module_xyz\n")
    with pytest.raises(UserError, match="has no function 'scor'; did you mean 'score'"):
        build_reward("python:r.py:scor", base_dir=tmp_path)
    with pytest.raises(UserError, match="not a function"):
        build_reward("python:r.py:answer", base_dir=tmp_path)
    with pytest.raises(UserError, match="importing .*broken.py failed .*ModuleNotFoundError"):
        build_reward("python:broken.py:score", base_dir=tmp_path)


def test_per_text_callable_is_rejected_with_a_wrapping_hint():
    def positivity(text):
        return 1.0

    with pytest.raises(UserError, match="'positivity'.*must accept.*lambda prompts, completions, metadata"):
        build_reward(positivity)


COMPLETIONS = ["fine", "ok", "good", "The sky is blue and the grass is green and the sea is deep and wide"]


@pytest.mark.parametrize(
    "returned, needles",
    [
        ([0.0, 0.0], ["reward 'bad' returned 2 values for 4 completions"]),
        ([0.0, 0.0, "high", 0.0], ["reward 'bad'", "one float per completion"]),
        (1.0, ["reward 'bad'", "float", "one float per completion"]),
    ],
)
def test_bad_reward_outputs(returned, needles):
    def bad(prompts, completions, metadata):
        return returned

    with pytest.raises(UserError) as info:
        build_reward(bad).score([""] * 4, COMPLETIONS, [{}] * 4)
    for needle in needles:
        assert needle in str(info.value)


def test_nonfinite_rewards_pass_through_as_no_reward():
    """NaN / inf are "no reward" for that sample (PPO leaves it out), not an error; the weighted total keeps them."""

    def flaky(prompts, completions, metadata):
        return [0.5, float("nan"), float("inf"), 1.0]

    total, components = build_reward([{"spec": flaky, "weight": 2.0}]).score([""] * 4, COMPLETIONS, [{}] * 4)
    assert total[0] == 1.0 and total[3] == 2.0 and math.isnan(total[1]) and total[2] == float("inf")
    assert math.isnan(components["flaky"][1])


def test_raising_reward_names_component_batch_and_exception(tmp_path):
    (tmp_path / "r.py").write_text("def score(prompts, completions, metadata):\n    return [1 / 0]\n")
    with pytest.raises(UserError) as info:
        build_reward("python:r.py:score", base_dir=tmp_path)(["p"] * 2, ["The sky", "x"], [{}] * 2)
    message = str(info.value)
    assert "reward 'python_score' raised ZeroDivisionError: division by zero" in message
    assert 'batch of 2 samples (first: "The sky")' in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# ---- hf-classifier on a tiny local model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A randomly initialised 2-layer BERT sentiment classifier with a word-level tokenizer, saved locally."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = "the sky is blue red good bad i love hate it this a day".split()
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )  # fmt: skip
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_classifier")
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


TEXTS = ["the sky is blue", "i love it", "bad day", "", "red red red"] * 4  # lengths differ: batches hold padding


def test_hf_classifier_scores_probabilities_in_batches(tiny_classifier):
    reward = build_reward(f"hf-classifier:{tiny_classifier}")
    assert reward.names == ["hf_classifier"]
    scores = reward([""] * 20, TEXTS, [{}] * 20)  # 20 > batch size 16: two batches
    assert len(scores) == 20 and all(0.0 <= s <= 1.0 for s in scores)
    one_by_one = [reward([""], [text], [{}])[0] for text in TEXTS]
    assert scores == pytest.approx(one_by_one, abs=1e-5)  # padding does not change a score
    negative = build_reward(f"hf-classifier:{tiny_classifier}:NEGATIVE")([""] * 20, TEXTS, [{}] * 20)
    assert [p + n for p, n in zip(scores, negative)] == pytest.approx([1.0] * 20)
    by_index = build_reward(f"hf-classifier:{tiny_classifier}:0")([""] * 20, TEXTS, [{}] * 20)
    assert by_index == pytest.approx(negative)


def test_hf_classifier_relative_to_base_dir_and_bad_label(tiny_classifier):
    reward = build_reward(f"hf-classifier:{tiny_classifier.name}:positive", base_dir=tiny_classifier.parent)
    assert math.isfinite(reward([""], ["good day"], [{}])[0])
    with pytest.raises(UserError, match="no label 'happy'.*NEGATIVE"):
        build_reward(f"hf-classifier:{tiny_classifier}:happy")


def test_hf_classifier_offline_hub_id_says_to_pass_a_directory(monkeypatch, tmp_path):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(UserError) as info:
        build_reward("hf-classifier:someone/sentiment-model", base_dir=tmp_path)
    message = str(info.value)
    assert "'someone/sentiment-model'" in message and "OSError" in message and "local directory" in message


def test_hf_classifier_missing_or_broken_directory(tmp_path):
    with pytest.raises(UserError, match="no such directory .*nope"):
        build_reward("hf-classifier:./nope", base_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load a classifier and tokenizer from .*empty"):
        build_reward("hf-classifier:empty", base_dir=tmp_path)
