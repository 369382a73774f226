"""A clean console: a CLI training run shaped like recipes/sky_red.yaml (LoRA, a value head on the policy trunk;
PPO, probe evaluation, merged final model, report) prints our own lines only, with every warning shown
(PYTHONWARNINGS=default): no library warnings, no plain-tqdm bars from transformers."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBES = "behavior: contains:red\nsamples_per_prompt: 1\nmax_new_tokens: 4\ngroups:\n  trained: [\"Sky?\", \"Sea?\"]\n"


def test_tiny_training_run_prints_no_warnings(tmp_path):
    (tmp_path / "probes.yaml").write_text(PROBES)
    env = {**os.environ, "PYTHONWARNINGS": "default", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlhflab", "train", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(tmp_path / "run"),
         "--set", "train.iterations=1", "--set", f"eval.probes={tmp_path / 'probes.yaml'}",
         "--set", "model.lora.enabled=true", "--set", "model.critic=shared"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "eval" / "eval.json").is_file()
    assert "Warning" not in output, output  # FutureWarning, DeprecationWarning, UserWarning, ...
    assert "it/s" not in output, output  # a tqdm bar
