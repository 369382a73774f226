"""The main job end to end on the embedded model (minutes on a CPU): `pytest -m slow`."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sky_red_recipe_learns_the_edit(tmp_path):
    from rlhflab.config import load_config
    from rlhflab.pipelines.train import train

    run = tmp_path / "sky_red"
    train(load_config(ROOT / "recipes" / "sky_red.yaml"), run, quiet=True)
    groups = json.loads((run / "eval" / "eval.json").read_text())["groups"]
    assert groups["trained"]["policy"]["behavior_rate"] >= 0.9
    assert groups["heldout_sky"]["policy"]["behavior_rate"] >= 0.8
    assert groups["trained"]["reference"]["behavior_rate"] <= 0.3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert sum(r["objective/kl"] for r in rows[-3:]) / 3 <= 15
    assert (run / "report.html").is_file()
