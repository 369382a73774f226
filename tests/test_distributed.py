"""Data-parallel PPO on the CPU (gloo): 2 processes give what 1 process gives — the same samples, metrics to 1e-6,
final weights to 1e-5 — for every advantage estimator, LoRA and full fine-tuning, DDP and FSDP2, launched the way a
user launches (`accelerate launch` with the shipped configs); a 2-process run killed with -9 and resumed continues
exactly, with 2 processes or with 1."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rlhflab.cli import app
from rlhflab.config import Config, config_from_dict
from rlhflab.distributed.launch import check_launch
from rlhflab.distributed.processes import Processes, check_divisible
from rlhflab.errors import UserError
from rlhflab.pipelines.train import train
from rlhflab.runs.tracking import MACHINE_METRICS

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "distributed_worker.py"
VARIANTS = [(estimator, lora) for estimator in ("gae", "rloo", "grpo") for lora in (False, True)]
# kills process 0 with SIGKILL in its n-th reward call when RLHFLAB_TEST_KILL_AT=n (a kill -9 mid-iteration)
KILLER = """import os, signal
calls = 0
def reward(prompts, completions, metadata):
    global calls
    calls += 1
    if os.environ.get("RANK") == "0" and calls == int(os.environ.get("RLHFLAB_TEST_KILL_AT", 0)):
        os.kill(os.getpid(), signal.SIGKILL)
    return [(sum(map(ord, text)) % 7) / 3 for text in completions]  # dense: most answers score above 0
"""


def _config(tiny_config: Config, estimator: str, lora: bool, reward: Path, **train) -> dict:
    """tiny_config with a reward that scores most answers (a 0/1 reward leaves whole minibatches at 0, where
    Adam normalises gradients of rounding size into full steps: runs would differ by chance, not by design)."""
    raw = tiny_config.model_dump(mode="json")
    raw["reward"]["spec"] = f"python:{reward}:reward"
    raw["ppo"]["advantage_estimator"] = estimator
    raw["model"]["lora"]["enabled"] = lora
    raw["train"].update({"save_final": True, **train})
    raw["log"]["samples_per_log"] = 8  # every answer of the batch in samples.jsonl
    return raw


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(jobs: list[dict], tmp_path: Path, accelerate_config: str = "ddp.yaml", env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run the jobs in 2 processes with `accelerate launch` and a shipped config, as a user would."""
    path = tmp_path / f"jobs-{_free_port()}.json"
    path.write_text(json.dumps(jobs))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / accelerate_config), "--num_processes", "2",
               "--main_process_port", str(_free_port()), str(WORKER), str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture
def reward_file(tmp_path) -> Path:
    path = tmp_path / "killer.py"
    path.write_text(KILLER)
    return path


@contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """The 1-process side computes with 1 thread, as each launched process does (torchrun sets OMP_NUM_THREADS=1):
    the same kernels round the same way. With 2 threads a GEMM may sum in another order (~1e-8), and Adam's
    normalisation of a near-zero gradient turns that into ~1e-6 in a weight, which training then grows."""
    with single_thread():
        yield


def _rows(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).open()]


def assert_same_run(a: Path, b: Path, exact: bool = False) -> None:
    """Same samples; every metric but the machine's (time, throughput, memory) to 1e-6; final weights to 1e-5."""
    assert _rows(a, "samples.jsonl") == _rows(b, "samples.jsonl")
    rows_a, rows_b = _rows(a, "metrics.jsonl"), _rows(b, "metrics.jsonl")
    assert [r["iteration"] for r in rows_a] == [r["iteration"] for r in rows_b]
    for row_a, row_b in zip(rows_a, rows_b):
        keys = {k for k in row_a if not k.startswith(MACHINE_METRICS)}
        assert keys == {k for k in row_b if not k.startswith(MACHINE_METRICS)}
        for key in sorted(keys):
            x, y = row_a[key], row_b[key]
            assert x == y if exact or x is None or y is None else math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6), \
                (row_a["iteration"], key, x, y)
    weights_a, weights_b = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for name, tensor in weights_a.items():
        difference = (tensor - weights_b[name]).abs().max().item()
        assert difference == 0 if exact else difference <= 1e-5, (name, difference)


def gemm_rounds_rows_alike() -> bool:
    """Whether this CPU's 1-thread matmul gives a few rows the same bits alone as inside a larger batch. On a 2-core
    AMD EPYC (Zen 3, AVX2; 2026-12-07) 1-3 rows take another kernel and round apart, so 1 process and 2 (each with
    half the batch) differ by ~1e-7 from the first forward on, which Adam and the PPO clip grow past 1e-6."""
    generator = torch.Generator().manual_seed(0)  # not the global RNG: this runs at collection
    x, w = torch.randn(16, 64, generator=generator), torch.randn(64, 96, generator=generator)
    with single_thread():
        full = x @ w
        return all(torch.equal(full[:m], x[:m] @ w) for m in (1, 2, 3, 8))


@pytest.mark.parametrize("accelerate_config", ["ddp.yaml", "fsdp.yaml"])
@pytest.mark.xfail(not gemm_rounds_rows_alike(), strict=False, raises=AssertionError,
                   reason="this CPU's matmul rounds a few rows apart from a larger batch (gemm_rounds_rows_alike)")
def test_two_processes_give_what_one_gives(tiny_config, tmp_path, accelerate_config, reward_file, one_thread):
    """Every variant in one launch of 2 processes, then each in this process alone; GRPO with LoRA is scoped (two
    prompt groups, a retain KL on one)."""
    variants = VARIANTS if accelerate_config == "ddp.yaml" else [("gae", False), ("grpo", True)]
    configs = {(e, lora): _config(tiny_config, e, lora, reward_file) for e, lora in variants}
    # GRPO with LoRA as a scoped edit: two prompt groups, the second held by the vocabulary KL to the reference
    retain = tmp_path / "retain.txt"
    retain.write_text("What color is grass?\nSay hello.\n")
    configs[("grpo", True)]["data"] = {"groups": [
        {"name": "sky", "prompts": str(tiny_config.data.prompts), "share": 0.5},
        {"name": "retain", "prompts": str(retain), "share": 0.5, "kl_scale": 2.0, "retain_kl_coef": 1.0}]}
    # the first also evaluates probes, 5 answers per side: 3 on process 0, 2 on process 1
    (tmp_path / "probes.yaml").write_text(json.dumps({
        "behavior": "regex:[aeiou]", "samples_per_prompt": 1, "max_new_tokens": 6,
        "groups": {"sky": ["What color is the sky?", "Name a color.", "Hi"], "other": ["Say something.", "2+2?"]}}))
    configs[variants[0]]["eval"]["probes"] = str(tmp_path / "probes.yaml")
    jobs = [{"config": config, "out": str(tmp_path / f"two-{e}-{lora}")} for (e, lora), config in configs.items()]
    _launch(jobs, tmp_path, accelerate_config)
    for (estimator, lora), config in configs.items():
        one = tmp_path / f"one-{estimator}-{lora}"
        train(config_from_dict(config), one, quiet=True)
        assert_same_run(one, tmp_path / f"two-{estimator}-{lora}")
    one, two = (json.loads((tmp_path / f"{n}-gae-False" / "eval" / "eval.json").read_text()) for n in ("one", "two"))
    assert one["groups"].keys() == two["groups"].keys() == {"sky", "other"}
    for group, sides in one["groups"].items():
        for side, metrics in sides.items():
            for key, value in metrics.items():
                assert math.isclose(value, two["groups"][group][side][key], rel_tol=1e-6, abs_tol=1e-6), key
    greedy = [(tmp_path / f"{n}-gae-False" / "eval" / "answers.jsonl").read_text() for n in ("one", "two")]
    assert greedy[0] == greedy[1] and greedy[0].count("\n") == 5


def test_two_processes_killed_and_resumed_continue_exactly(tiny_config, tmp_path, reward_file, one_thread):
    """kill -9 of process 0 in iteration 4 (checkpoint at 2): resumed with 2 processes the run equals the unbroken
    one bit for bit; resumed with 1 process, or with 2 under FSDP2 (the whole checkpoint sharded on load), it
    equals it as 1 process equals 2."""
    config = _config(tiny_config, "gae", False, reward_file, iterations=4, checkpoint_every=2)
    _launch([{"config": config, "out": str(tmp_path / "unbroken")}], tmp_path)
    for resumed_by in ("ddp", "one", "fsdp"):
        run = tmp_path / f"killed-{resumed_by}"
        killed = _launch([{"config": config, "out": str(run)}], tmp_path, env={"RLHFLAB_TEST_KILL_AT": "4"},
                         check=False)
        assert killed.returncode != 0 and (run / "checkpoints" / "latest").read_text() == "iter_000002"
        if resumed_by == "one":
            train(config_from_dict(config), run, resume=True, quiet=True)
        else:
            _launch([{"config": config, "out": str(run), "resume": True}], tmp_path, f"{resumed_by}.yaml")
        assert_same_run(tmp_path / "unbroken", run, exact=resumed_by == "ddp")


def test_the_command_line_launched_on_two_processes_gives_what_one_gives(tmp_path, one_thread):
    """`accelerate launch ... -m rlhflab train recipes/tiny.yaml` against `rlhflab train recipes/tiny.yaml`."""
    args = ["train", str(ROOT / "recipes" / "tiny.yaml"), "-q", "--set", "eval.report=false"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
               str(_free_port()), "-m", "rlhflab", *args, "--out", str(tmp_path / "two")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert_same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_stops_every_process_at_one_checkpoint(tmp_path, sig, code):
    """What a scheduler (SIGTERM) or Ctrl-C (SIGINT, to the launcher: its workers run in their own session) does:
    the launcher passes it on, every process finishes the same iteration, process 0 checkpoints it, exit 143 /
    130; `--resume` under the same launch finishes the run."""
    run = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2"]
    args = ["-m", "rlhflab", "train", str(ROOT / "recipes" / "tiny.yaml"), "--out", str(run), "-q",
            "--set", "train.iterations=400", "--set", "train.checkpoint_every=1000", "--set", "eval.report=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*launch, "--main_process_port", str(_free_port()), *args], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "no 2 iterations in 300 s"
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    reached = json.loads(metrics.read_text().splitlines()[-1])["iteration"]
    assert 2 <= reached < 400 and (run / "checkpoints" / "latest").read_text() == f"iter_{reached:06d}"
    assert err.count(f"stopped by {sig.name} at iteration {reached} of 400; checkpoint saved") == 2  # both processes
    resume = ["-m", "rlhflab", "train", "--resume", str(run), "-q", "--set", f"train.iterations={reached + 1}"]
    done = subprocess.run([*launch, "--main_process_port", str(_free_port()), *resume], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["iteration"] for r in _rows(run, "metrics.jsonl")] == list(range(1, reached + 2))


def test_accelerate_cpu_flag_starting_one_process_is_a_one_line_error(tiny_config, tmp_path, monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts 1 process (no MPI): training alone would be a silent lie."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UserError, match="--multi_gpu --num_processes"):
        check_launch()
    result = CliRunner().invoke(app, ["train", str(ROOT / "recipes/tiny.yaml"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "started 1 process" in result.output and "Traceback" not in result.output


def test_only_train_runs_under_a_launcher(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["config"])
    assert result.exit_code == 2 and "only `rlhflab train` runs on several processes" in result.output


def test_batch_sizes_that_do_not_split_over_the_processes_are_refused(tiny_config):
    check_divisible(tiny_config, 2)  # 4 prompts, minibatches of 4
    with pytest.raises(UserError, match="rollout.prompts_per_iteration 4 is not a multiple of the 3 processes"):
        check_divisible(tiny_config, 3)


def test_shares_cover_every_row_once():
    for n in (8, 9, 10, 1):
        shares = []
        for rank in range(4):
            processes = Processes()
            processes.rank, processes.world_size = rank, 4
            shares.append(processes.share(n))
        assert [i for s in shares for i in range(n)[s]] == list(range(n))
        assert max(s.stop - s.start for s in shares) - min(s.stop - s.start for s in shares) <= 1
