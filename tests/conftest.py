import os

import pytest

# Nothing is downloaded: tiny models are built locally, the embedded one comes from its package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("What color is the sky?\nName a color.\nSay something.\nDescribe the sea.\n")
    return path


@pytest.fixture
def tiny_config(prompt_file):
    """A config for the tiny random model: a PPO iteration takes a fraction of a second. float32, whatever the
    CPU: tests compare numbers exactly; tests/test_precision.py covers bf16 autocast."""
    from rlhflab.config import Config

    return Config.model_validate({
        "model": {"name": "tiny", "prompt_format": "chat", "dtype": "float32"},
        "data": {"prompts": str(prompt_file)},
        "rollout": {"prompts_per_iteration": 4, "samples_per_prompt": 2, "max_new_tokens": 8},
        "reward": {"spec": "regex:[aeiou]"},
        "ppo": {"epochs": 2, "minibatch_size": 4, "micro_batch_size": 2},
        "train": {"iterations": 2, "learning_rate": 1e-3, "checkpoint_every": 0, "save_final": False},
        "eval": {"report": False},
    })


# A judge that almost never ties on the tiny model's random bytes (a tie would not train the RM).
JUDGE = "def score(prompts, completions, metadata):\n    return [float(sum(map(ord, c)) % 101) for c in completions]\n"


@pytest.fixture
def loop_file(tmp_path, prompt_file):
    """An RLHF loop on the tiny model: 6 pairs per round, a 1-epoch RM normalised on 8 of the 12 answers, 1 PPO iteration
    of 8 answers."""
    import yaml

    (tmp_path / "judge.py").write_text(JUDGE)
    recipe = {
        "model": {"name": "tiny", "prompt_format": "plain"},
        "data": {"prompts": str(prompt_file)},
        "rollout": {"prompts_per_iteration": 4, "samples_per_prompt": 2, "max_new_tokens": 8},
        "reward": {"spec": "length"},
        "ppo": {"epochs": 1, "minibatch_size": 8},
        "train": {"iterations": 1, "learning_rate": 1e-3, "checkpoint_every": 0},
        "eval": {"report": False},
    }
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(recipe))
    loop = {
        "recipe": "ppo.yaml", "rounds": 2, "pairs_per_round": 6, "judge": "python:judge.py:score",
        "eval_samples_per_prompt": 1,
        "rm": {"lora": False, "epochs": 1, "lr": 1e-3, "heldout_fraction": 0.25, "calibration_samples": 8},
        "set": ["ppo.kl_coef=0.1"],
    }  # fmt: skip
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(loop))
    return path


@pytest.fixture(autouse=True)
def _same_random_state():
    """Each test starts from seed 0: the trainer leaves seeding to its caller (runs.seeding.seed_everything)."""
    from rlhflab.runs.seeding import seed_everything

    seed_everything(0)


@pytest.fixture
def gguf_roundtrip():
    """bench/gguf_roundtrip.py as a module: the GGUF-vs-transformers comparison the slow tests share with the bench."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "gguf_roundtrip.py"
    spec = importlib.util.spec_from_file_location("gguf_roundtrip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
