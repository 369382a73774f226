"""The report of a synthetic run: self-contained HTML with the plots and tables, markdown beside it."""

import json
import math
import random
from pathlib import Path

import pytest
import yaml

from rlhflab.errors import UserError
from rlhflab.evaluation.report import write_report

GROUPS = {"trained": (0.05, 0.95), "related": (0.05, 0.6), "unrelated": (0.1, 0.15), "capability": (0.0, 0.0)}


def probe_rates(i: int) -> dict:
    """eval/<group>/behavior_rate moving from its before to its after value over 12 iterations."""
    return {f"eval/{g}/behavior_rate": a + (b - a) * min(i / 12, 1) for g, (a, b) in GROUPS.items()}


def metric_row(i: int, rng: random.Random) -> dict:
    """One iteration of a plausible run: reward rising, KL growing, diversity slowly falling."""
    noise = lambda scale: rng.gauss(0, scale)  # noqa: E731
    kl = 0.05 * i + abs(noise(0.02))
    score = 0.9 * (1 - math.exp(-i / 4)) + noise(0.04)
    return {
        "iteration": i,
        "objective/scores": score,
        "objective/rlhf_reward": score - 0.05 * kl,
        "objective/kl": kl,
        "objective/kl_k1": kl,
        "objective/kl_k2": kl * 0.9,
        "objective/kl_k3": kl * 0.95 + abs(noise(0.01)),
        "objective/kl_coef": 0.05 + 0.002 * i,
        "objective/entropy": 2.2 - 0.08 * i + noise(0.05),
        "policy/approxkl": 0.01 + abs(noise(0.005)),
        "policy/clipfrac": 0.05 + abs(noise(0.02)),
        "policy/ratio_mean": 1 + noise(0.01),
        "policy/ratio_max": 1.6 + abs(noise(0.3)),
        "policy/grad_norm": 1.0,
        "policy/lr": 1e-5,
        "loss/policy": noise(0.05),
        "loss/value": 0.3 / i,
        "value/explained_variance": -0.4 + 0.1 * i + noise(0.05),
        "value/clipfrac": 0.1,
        "rollout/response_length": 18 + i + noise(1.5),
        "rollout/eos_rate": 0.95 - 0.01 * i,
        "reward/contains_red": score,
        "reward/length_penalty": -0.02 * i,
        "diversity/distinct_1": 0.6 - 0.01 * i,
        "diversity/distinct_2": 0.85 - 0.015 * i,
        "time/rollout": 3.0,
        "time/update": 2.0,
        "time/iteration": 5.0,
        "throughput/tokens_per_s": 400.0,
        **(probe_rates(i) if i % 4 == 0 else {}),
    }


def eval_side(rate: float, kl: float) -> dict:
    return {
        "behavior_rate": rate, "reward_mean": rate, "kl_k1": kl, "kl_k3": kl * 0.9, "distinct_1": 0.5,
        "distinct_2": 0.7, "self_bleu": 0.2, "entropy": 1.8, "nll_reference": 2.1 + kl, "length": 14.0,
    }  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_run_dir(root: Path, iterations: int = 12, with_eval: bool = True) -> Path:
    """A run directory as the trainer and `rlhflab eval` would leave it."""
    rng = random.Random(0)
    run_dir = root / "sky_red_run"
    run_dir.mkdir(parents=True)
    rows = [metric_row(i, rng) for i in range(1, iterations + 1)]
    write_jsonl(run_dir / "metrics.jsonl", rows)
    samples = [
        {"iteration": it, "prompt": f"What colour is the sky? #{k}", "completion": f"The sky is {colour} <b>today</b>.",
         "score": float(colour == "red"), "components": {"contains_red": float(colour == "red")}}
        for it, colour in ((1, "blue"), (iterations, "red")) for k in range(3)
    ]  # fmt: skip
    write_jsonl(run_dir / "samples.jsonl", samples)
    config = {"model": {"policy": "embedded:smollm2-135m"}, "ppo": {"kl_coef": 0.05, "lr": 1e-5}, "seed": 0}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if with_eval:
        (run_dir / "eval").mkdir()
        groups = {g: {"policy": eval_side(b, 0.8), "reference": eval_side(a, 0.0)} for g, (a, b) in GROUPS.items()}
        evaluation = {"behavior": "contains:red", "groups": groups, "elapsed_s": 95.0}
        (run_dir / "eval" / "eval.json").write_text(json.dumps(evaluation))
        answers = [
            {"group": g, "prompt": f"{g} prompt {k}", "policy": "It is red & <i>bright</i>.",
             "reference": "It is blue.", "policy_reward": 1.0, "reference_reward": 0.0}
            for g in GROUPS for k in range(2)
        ]  # fmt: skip
        write_jsonl(run_dir / "eval" / "answers.jsonl", answers)
    return run_dir


def test_full_report(tmp_path):
    run_dir = make_run_dir(tmp_path)
    html_path, md_path = write_report(run_dir)
    page = html_path.read_text()
    assert html_path == run_dir / "report.html" and md_path == run_dir / "report.md"
    assert page.count('<img src="data:image/png;base64,') >= 6
    assert "src=\"plots/" not in page  # self-contained: nothing linked
    for group in GROUPS:  # the probe-group table and the answers table name every group
        assert f"<td>{group}</td>" in page and f"<h4>{group}</h4>" in page
    assert "0.05 → 0.95" in page  # trained group's behaviour rate, reference → policy
    assert "It is red &amp; &lt;i&gt;bright&lt;/i&gt;." in page  # model text is escaped, not rendered
    assert "&lt;b&gt;today&lt;/b&gt;" in page
    assert "<details><summary>config.yaml" in page
    assert "No alarms" in page
    plots = sorted(p.name for p in (run_dir / "plots").glob("*.png"))
    assert {"reward.png", "kl.png", "reward_vs_kl.png", "behavior_by_group.png", "diversity.png"} <= set(plots)
    markdown = md_path.read_text()
    assert "![Reward](plots/reward.png)" in markdown and "| trained |" in markdown


def test_report_without_eval_and_with_missing_keys(tmp_path):
    run_dir = make_run_dir(tmp_path, iterations=3, with_eval=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # no critic, no diversity, no eval
        for key in [k for k in row if k.startswith(("value/", "diversity/", "eval/"))]:
            del row[key]
    rows[1].pop("objective/kl")  # a row without the KL used in the reward
    write_jsonl(run_dir / "metrics.jsonl", rows)
    with (run_dir / "metrics.jsonl").open("a") as f:  # a run killed mid-write leaves a cut-off last line
        f.write('{"iteration": 4, "obj')
    page = write_report(run_dir)[0].read_text()
    assert page.count("data:image/png;base64,") >= 5
    assert "Probe evaluation" not in page
    assert not (run_dir / "plots" / "explained_variance.png").exists()


def test_health_notes_appear_with_cause_and_fix(tmp_path):
    run_dir = make_run_dir(tmp_path, iterations=6, with_eval=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows[3]["policy/ratio_max"] = 400.0
    write_jsonl(run_dir / "metrics.jsonl", rows)
    page = write_report(run_dir)[0].read_text()
    assert "ratio_blowup: policy/ratio_max = 400 at iteration 4" in page and "Likely cause:" in page and "Fix:" in page


def test_missing_metrics_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl"):
        write_report(tmp_path)


def test_prompt_groups_table_locality_map_and_evaluation_alarms(tmp_path):
    """A scoped run: the groups table from config + group/* metrics, the probe alarms from eval.json."""
    run_dir = make_run_dir(tmp_path)
    config = {"data": {"groups": [
        {"name": "sky", "share": 0.75, "reward": [{"spec": "contains:red", "weight": 1.0}], "kl_scale": 1.0,
         "expect": "behaviour"},
        {"name": "retain", "share": 0.25, "reward": "not:contains:red", "kl_scale": 4.0, "retain_kl_coef": 2.0,
         "expect": "unchanged"},
    ]}}  # fmt: skip
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        i = row["iteration"]
        row.update({"group/sky/behaviour": 0.1 * i, "group/sky/length": 30.0, "group/retain/behaviour": 0.05,
                    "group/retain/length": 32.0, "group/sky/score": 0.1 * i, "group/retain/score": 0.95,
                    "group/sky/kl": 0.1, "group/retain/kl": 0.02})
    write_jsonl(run_dir / "metrics.jsonl", rows)
    evaluation = json.loads((run_dir / "eval" / "eval.json").read_text())
    evaluation["unchanged"] = ["related", "unrelated"]
    evaluation["groups"]["trained"]["policy"]["length"] = 3.8  # reference: 14 tokens
    (run_dir / "eval" / "eval.json").write_text(json.dumps(evaluation))
    page = write_report(run_dir)[0].read_text()
    assert "<h2>Prompt groups</h2>" in page
    assert ('<td>retain</td><td class="num">0.25</td><td>not:contains:red</td><td class="num">4</td>'
            '<td class="num">2</td><td>unchanged</td>') in page
    assert "<td>1·contains:red</td>" in page and "0.1 → 1.2" in page  # sky behaviour, first → last
    assert "answers_shrink: probe answers are under half the reference&#x27;s length: trained 3.8 vs 14.0" in page
    assert "behaviour_leak:" in page and "related 0.05 → 0.6" in page and "unrelated" not in page.split(
        "behaviour_leak:")[1].split("</")[0]  # unrelated rose 0.05 only
    assert {"group_behaviour.png", "group_length.png"} <= {p.name for p in (run_dir / "plots").glob("*.png")}
