"""The main job end to end on the embedded model (minutes on a CPU): `pytest -m slow`."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sky_red_run(tmp_path_factory):
    from rlhflab.config import load_config
    from rlhflab.pipelines.train import train

    run = tmp_path_factory.mktemp("sky") / "sky_red"
    train(load_config(ROOT / "recipes" / "sky_red.yaml"), run, quiet=True)
    return run


@pytest.mark.slow
def test_sky_red_recipe_learns_the_edit(sky_red_run):
    run = sky_red_run
    groups = json.loads((run / "eval" / "eval.json").read_text())["groups"]
    assert groups["trained"]["policy"]["behavior_rate"] >= 0.9
    assert groups["heldout_sky"]["policy"]["behavior_rate"] >= 0.8
    assert groups["trained"]["reference"]["behavior_rate"] <= 0.3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert sum(r["objective/kl"] for r in rows[-3:]) / 3 <= 15
    assert (run / "report.html").is_file()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (run / "final" / "README.md").read_text()


@pytest.mark.slow
def test_sky_red_gguf_says_red_in_llama_cpp(sky_red_run, tmp_path, gguf_roundtrip):
    pytest.importorskip("llama_cpp", reason="needs the gguf-client extra (llama-cpp-python)")
    bench = gguf_roundtrip
    rows = bench.roundtrip(str(sky_red_run), ["f32"], ROOT / "recipes/data/sky_probes.yaml", "trained", 24,
                           tmp_path, echo=lambda line: None)["f32"]
    sky = next(r for r in rows if r["prompt"] == bench.SKY)
    assert bench.says_red(sky["llama"]), sky
    assert all(r["agree"] or abs(r.get("gap", 1.0)) < 0.01 for r in rows), rows
