"""The main job end to end on the embedded model (minutes on a CPU): `pytest -m slow`."""

import json
from pathlib import Path

import pytest

from rlhflab.evaluation.probes import load_probes

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sky_red_run(tmp_path_factory):
    from rlhflab.config import load_config
    from rlhflab.pipelines.train import train

    run = tmp_path_factory.mktemp("sky") / "sky_red"
    train(load_config(ROOT / "recipes" / "sky_red.yaml"), run, quiet=True)
    return run


def probe_sides(run: Path) -> tuple[dict, dict]:
    groups = json.loads((run / "eval" / "eval.json").read_text())["groups"]
    return ({name: sides["policy"] for name, sides in groups.items()},
            {name: sides["reference"] for name, sides in groups.items()})


@pytest.mark.slow
def test_sky_red_recipe_learns_the_edit_and_keeps_its_answers(sky_red_run):
    """The main job (seed 0): the edit is learned and generalises, answers stay sentences as long as the
    reference's, capability answers stay as correct as the reference's, the KL stays bounded."""
    run = sky_red_run
    policy, reference = probe_sides(run)
    assert policy["trained"]["behavior_rate"] >= 0.8  # 0.97 for seed 0 on 2 threads (README)
    assert policy["heldout_sky"]["behavior_rate"] >= 0.5  # 0.62-0.91 over the runs in the recipe comment (base 0.00)
    assert policy["heldout_sky"]["length"] >= 0.5 * reference["heldout_sky"]["length"]
    # sampled answers, within the capability_loss alarm's tolerance
    assert policy["capability"]["correct_rate"] >= reference["capability"]["correct_rate"] - 0.10
    answers = [json.loads(line) for line in (run / "eval" / "answers.jsonl").open()]
    sky = next(a["policy"] for a in answers if a["prompt"] == "What color is the sky?")
    says_red = load_probes(ROOT / "recipes/data/sky_probes.yaml").behavior_reward()  # a name ("The Red Sun") is not red
    assert says_red([""], [sky], [{}]) == [1.0] and len(sky.split()) >= 4, sky
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert rows[-1]["objective/kl"] <= 15  # 10.9-11.9 over the runs in the recipe comment
    assert (run / "report.html").is_file()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (run / "final" / "README.md").read_text()


@pytest.mark.slow
@pytest.mark.xfail(reason="issue 16's targets are not met on every seed yet: held-out sky phrasings reach 0.62-0.91 "
                          "on seeds 0-2 (docs/experiments/edit_scope.md)",
                   strict=False)
def test_sky_red_recipe_meets_the_scope_targets(sky_red_run):
    """Issue 16: held-out sky phrasings say red at 0.9, other colour questions no more than 0.10 above the
    reference, KL at most 15 nats per answer at the end."""
    policy, reference = probe_sides(sky_red_run)
    assert policy["heldout_sky"]["behavior_rate"] >= 0.9
    assert policy["unrelated"]["behavior_rate"] <= reference["unrelated"]["behavior_rate"] + 0.10
    rows = [json.loads(line) for line in (sky_red_run / "metrics.jsonl").open()]
    assert rows[-1]["objective/kl"] <= 15


@pytest.mark.slow
def test_sky_red_gguf_says_red_in_llama_cpp(sky_red_run, tmp_path, gguf_roundtrip):
    pytest.importorskip("llama_cpp", reason="needs the gguf-client extra (llama-cpp-python)")
    bench = gguf_roundtrip
    rows = bench.roundtrip(str(sky_red_run), ["f32"], ROOT / "recipes/data/sky_probes.yaml", "trained", 24,
                           tmp_path, echo=lambda line: None)["f32"]
    sky = next(r for r in rows if r["prompt"] == bench.SKY)
    assert bench.says_red(sky["llama"]), sky
    assert all(r["agree"] or abs(r.get("gap", 1.0)) < 0.01 for r in rows), rows
