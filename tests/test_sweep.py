"""Sweeps and comparisons on the tiny model: a 2 × 2 sweep, skipping and resuming, compare, bad sweep files,
and the shipped sweep files and positive-review recipe (validated only, never run here)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rlhflab.cli import app
from rlhflab.config import load_config
from rlhflab.errors import UserError
from rlhflab.evaluation.compare import compare, compare_sweep
from rlhflab.pipelines.sweep import DONE, plan_runs, run_name, run_sweep

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"
NAMES = ["kl_coef=0.0__seed=0", "kl_coef=0.1__seed=0", "kl_coef=0.0__seed=1", "kl_coef=0.1__seed=1"]
FAST = {"train.iterations": 2, "train.checkpoint_every": 1, "train.save_final": False, "eval.report": False,
        "rollout.prompts_per_iteration": 4, "ppo.minibatch_size": 8}  # fmt: skip


def write_sweep(folder: Path, grid: dict, seeds=(0, 1), extra: dict | None = None) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(TINY), "grid": grid, "seeds": list(seeds), "set": FAST,
                                    **(extra or {})}))
    return path


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A finished 2 (β) × 2 (seeds) sweep of 2-iteration tiny runs; tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("sweep")
    out = root / "out"
    run_sweep(write_sweep(root, {"ppo.kl_coef": [0.0, 0.1]}), out)
    return out


def test_sweep_runs_every_combination_and_records_it(sweep_dir):
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["dir"] for r in record["runs"]] == NAMES  # seeds outermost
    assert {r["status"] for r in record["runs"]} == {"done"}
    for entry in record["runs"]:
        run_dir = sweep_dir / entry["dir"]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["train"]["seed"] == entry["seed"]
        assert config["ppo"]["kl_coef"] == entry["overrides"]["ppo.kl_coef"]
        assert (run_dir / DONE).is_file()
        assert [r["iteration"] for r in rows(run_dir)] == [1, 2]


def test_rerun_skips_finished_runs(sweep_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sweep_dir, out)
    before = {name: (out / name / "metrics.jsonl").read_text() for name in NAMES}
    stamps = {name: (out / name / "metrics.jsonl").stat().st_mtime_ns for name in NAMES}
    lines = []
    run_sweep(write_sweep(tmp_path, {"ppo.kl_coef": [0.0, 0.1]}), out, echo=lines.append)
    assert all("skipped" in line for line in lines) and len(lines) == 4
    assert {name: (out / name / "metrics.jsonl").read_text() for name in NAMES} == before
    assert {name: (out / name / "metrics.jsonl").stat().st_mtime_ns for name in NAMES} == stamps


def test_interrupted_runs_are_resumed_or_restarted(sweep_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sweep_dir, out)
    # killed after iteration 1 with its checkpoint written: resumed from it, iteration 1 kept as it was
    resumed = out / NAMES[0]
    first_row = rows(resumed)[0]
    (resumed / DONE).unlink()
    shutil.rmtree(resumed / "checkpoints" / "iter_000002")
    (resumed / "checkpoints" / "latest").write_text("iter_000001")
    (resumed / "metrics.jsonl").write_text(json.dumps(first_row) + "\n")
    # killed before any checkpoint: started over in a fresh directory
    restarted = out / NAMES[3]
    (restarted / DONE).unlink()
    shutil.rmtree(restarted / "checkpoints")
    (restarted / "leftover.txt").write_text("from the killed attempt")
    lines = []
    run_sweep(write_sweep(tmp_path, {"ppo.kl_coef": [0.0, 0.1]}), out, echo=lines.append)
    assert "resuming" in lines[0] and "training" in lines[-2]
    assert sum("skipped" in line for line in lines) == 2
    assert [r["iteration"] for r in rows(resumed)] == [1, 2] and rows(resumed)[0] == first_row
    assert [r["iteration"] for r in rows(restarted)] == [1, 2] and not (restarted / "leftover.txt").exists()
    assert (resumed / DONE).is_file() and (restarted / DONE).is_file()
    assert {r["status"] for r in json.loads((out / "sweep.json").read_text())["runs"]} == {"done"}


def test_compare_sweep_builds_report(sweep_dir, tmp_path):
    html_path, md_path = compare_sweep(sweep_dir, tmp_path / "cmp")
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") >= 6
    assert "<img src=\"plots/" not in page  # self-contained
    md = md_path.read_text()
    assert "| group | runs | iterations | final reward | final KL (nats) | final distinct-2 |" in md
    table = [line for line in md.splitlines() if line.startswith("| kl_coef=")]
    assert [line.split(" | ")[0] for line in table[:2]] == ["| kl_coef=0.0", "| kl_coef=0.1"]
    assert all(" ± " in line for line in table[:2])  # two seeds per group
    for name in ("reward", "kl", "distinct_2", "entropy", "reward_vs_kl", "advantage_var", "grad_norm",
                 "seconds_per_iteration"):
        assert (tmp_path / "cmp" / "plots" / f"{name}.png").stat().st_size > 5000


def test_compare_run_dirs_groups_by_config_without_seed(sweep_dir, tmp_path):
    _, md_path = compare([sweep_dir / name for name in NAMES], tmp_path / "cmp")
    md = md_path.read_text()
    assert "| kl_coef=0.0 | 2 |" in md and "| kl_coef=0.1 | 2 |" in md
    _, md_path = compare([sweep_dir / NAMES[0], sweep_dir / NAMES[1]], tmp_path / "cmp2", labels=["no KL", "β 0.1"])
    assert "| no KL | 1 |" in md_path.read_text()
    with pytest.raises(UserError, match="one label per run"):
        compare([sweep_dir / NAMES[0]], tmp_path / "cmp3", labels=["a", "b"])


@pytest.mark.parametrize("grid, key", [
    ({"ppo.kl_coeff": [0.1]}, "ppo.kl_coeff"),  # unknown key
    ({"ppo.kl_coef": [0.1, -1]}, "ppo.kl_coef"),  # bad value in the second combination
    ({"ppo.minibatch_size": [8, 5]}, "minibatch_size"),  # a size check that fails
])  # fmt: skip
def test_bad_grid_fails_before_any_run(tmp_path, grid, key):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=key):
        run_sweep(write_sweep(tmp_path, grid), out)
    assert not out.exists()


def test_bad_sweep_file_names_the_key(tmp_path):
    path = write_sweep(tmp_path, {}, extra={"seed": [0]})
    with pytest.raises(UserError, match="did you mean 'seeds'"):
        plan_runs(path)
    path.write_text(yaml.safe_dump({"recipe": str(TINY), "grid": {"train.seed": [1, 2]}}))
    with pytest.raises(UserError, match="seeds"):
        plan_runs(path)
    path.write_text(yaml.safe_dump({"recipe": "missing.yaml"}))
    with pytest.raises(UserError, match="relative to the sweep file"):
        plan_runs(path)


def test_run_names_are_readable_and_stable():
    assert run_name({"ppo.kl_coef": 0.05}, 1) == "kl_coef=0.05__seed=1"
    assert run_name({"train.learning_rate": 1e-5, "ppo.advantage_estimator": "rloo"}, 0) == (
        "learning_rate=1e-05__advantage_estimator=rloo__seed=0")
    assert run_name({"ppo.epochs": 2, "train.epochs": 3}, 0) == "ppo.epochs=2__train.epochs=3__seed=0"
    assert run_name({}, 7) == "seed=7"


def test_cli_sweep_and_compare(tmp_path):
    runner = CliRunner()
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(TINY), "seeds": [3], "set": {**FAST, "train.iterations": 1}}))
    result = runner.invoke(app, ["sweep", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "seed=3" / DONE).is_file()
    assert (tmp_path / "out" / "compare" / "compare.html").is_file()
    result = runner.invoke(app, ["compare", "--sweep", str(tmp_path / "out"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0 and (tmp_path / "c" / "compare.md").is_file(), result.output
    result = runner.invoke(app, ["compare", str(tmp_path / "out" / "seed=3"), "--sweep", str(tmp_path / "out")])
    assert result.exit_code == 2 and "not both" in result.output


# ------------------------------------------------------------------------- shipped files (validated, not run)


def test_positive_reviews_recipe_matches_seed_001():
    c = load_config(ROOT / "recipes" / "positive_reviews.yaml")
    assert c.model.name == "smollm2-135m-instruct" and c.model.prompt_format == "plain"
    assert c.model.lora.enabled and c.model.critic == "separate" and c.uses_critic
    assert c.ppo.kl_coef == 0.05 and c.ppo.adaptive_kl_target is None and c.ppo.clip_range == 0.2
    assert c.train.lr_schedule == "cosine" and c.rollout.max_new_tokens == 48
    assert c.ppo.minibatch_size == 16 and c.micro_batch_size == 8  # 2 micro-batches of 8 per step
    assert c.reward.spec == "vader"
    assert Path(c.data.prompts).is_file() and len(Path(c.data.prompts).read_text().splitlines()) >= 200
    assert c.eval.probes and Path(c.eval.probes).is_file()


def test_shipped_sweeps_validate():
    _, runs = plan_runs(ROOT / "sweeps" / "kl_ablation.yaml")
    assert len(runs) == 8 and {r.config.ppo.kl_coef for r in runs} == {0, 0.01, 0.05, 0.1}
    assert all(r.config.train.learning_rate == 3e-3 and r.config.train.iterations == 24 for r in runs)
    assert all(r.config.model.critic == "shared" and r.config.rollout.max_new_tokens == 32 for r in runs)
    assert {r.seed for r in runs} == {0, 1} and all(r.config.train.seed == r.seed for r in runs)
    _, runs = plan_runs(ROOT / "sweeps" / "baselines.yaml")
    assert [r.config.ppo.advantage_estimator for r in runs[:4]] == ["gae", "reinforce", "rloo", "grpo"]
    assert len(runs) == 8 and all(r.config.rollout.samples_per_prompt == 2 for r in runs)
    assert len({r.config.rollout_batch_size for r in runs}) == 1
