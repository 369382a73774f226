"""Mixed precision: fp32 master weights learn at small learning rates where pure bf16 weights do not; `auto`
picks bf16 autocast only where the hardware runs it natively; the first ratio of an iteration is 1."""

import pytest
import torch

from rlhflab.models.precision import cpu_bf16_flags, resolve_precision
from rlhflab.pipelines.train import train
from rlhflab.ppo.trainer import PPOTrainer
from rlhflab.runs.tracking import Tracker

CPU = torch.device("cpu")


def _changed_fractions(trainer: PPOTrainer, before: dict) -> dict[str, float]:
    """Share of each trainable policy tensor's elements that moved."""
    return {n: (p.detach() != before[n]).float().mean().item()
            for n, p in trainer.policy.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", ["bf16-autocast", "bfloat16"])
def test_fp32_master_weights_learn_at_small_lr_where_pure_bf16_does_not(tiny_config, tmp_path, dtype):
    tiny_config.model.dtype = dtype
    tiny_config.train.learning_rate = 1e-5
    trainer = PPOTrainer(tiny_config, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.iteration_step(Tracker(tmp_path, [], "t", "t", {}))  # 4 AdamW steps of ~lr per element
    changed = _changed_fractions(trainer, before)
    overall = sum(changed.values()) / len(changed)
    if dtype == "bf16-autocast":
        assert next(trainer.policy.parameters()).dtype == torch.float32
        assert min(changed.values()) > 0.9, changed  # every tensor, nearly every element
    else:
        # a 1e-5 step is below half a bf16 ulp for any weight above ~2.6e-3 in magnitude: rounded away
        assert next(trainer.policy.parameters()).dtype == torch.bfloat16
        assert overall < 0.2, changed
        assert all(f == 0.0 for n, f in changed.items() if "norm" in n), changed  # weights of 1.0: ulp 2^-7


@pytest.mark.parametrize(("flags", "device", "name", "autocast"), [
    (set(), CPU, "fp32", False),  # AVX2-only CPUs: emulated bf16 is far slower than fp32
    ({"avx512_bf16"}, CPU, "bf16 autocast (AVX512-BF16)", True),
    ({"avx512_bf16", "amx_bf16"}, CPU, "bf16 autocast (AMX)", True),
    (set(), torch.device("mps"), "fp32", False),
])
def test_auto_uses_bf16_autocast_only_where_bf16_is_native(flags, device, name, autocast):
    p = resolve_precision("auto", device, cpu_flags=flags)
    assert (p.name, p.bf16_autocast, p.param_dtype) == (name, autocast, torch.float32)
    assert p.log_line == f"precision: {name}"


def test_auto_on_cuda_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    p = resolve_precision("auto", torch.device("cuda"), cpu_flags=set())
    assert (p.name, p.param_dtype, p.compute_dtype) == ("bf16 autocast (CUDA)", torch.float32, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_precision("auto", torch.device("cuda"), cpu_flags=set()).name == "fp32"


def test_explicit_choices_are_honoured_and_say_when_slow():
    assert resolve_precision("float32", CPU, cpu_flags={"amx_bf16"}).name == "fp32"
    pure = resolve_precision("bfloat16", CPU, cpu_flags=set())
    assert (pure.param_dtype, pure.bf16_autocast) == (torch.bfloat16, False)
    emulated = resolve_precision("bf16-autocast", CPU, cpu_flags=set())
    assert emulated.bf16_autocast and emulated.name == "bf16 autocast (emulated: slow)"


def test_autocast_runs_matmuls_in_bf16_and_log_probs_stay_fp32():
    from rlhflab.models.forward import ValueHead, logprobs_from_logits

    p = resolve_precision("bf16-autocast", CPU, cpu_flags={"avx512_bf16"})
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    head = ValueHead(8)
    with p.autocast():
        logits = (x @ w).unsqueeze(0)  # (1, 4, 8)
        assert logits.dtype == torch.bfloat16
        assert logprobs_from_logits(logits, torch.zeros(1, 4, dtype=torch.long)).dtype == torch.float32
        assert head(x).dtype == torch.float32
    with resolve_precision("float32", CPU).autocast():
        assert (x @ w).dtype == torch.float32


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_bf16_flags(info) == {"avx512_bf16"}
    assert cpu_bf16_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(("dtype", "mode", "expected"), [
    ("float32", "auto", False), ("bf16-autocast", "auto", True), ("float32", "always", True),
    ("bf16-autocast", "never", False),
])
def test_old_logprobs_are_recomputed_when_computing_in_bf16(tiny_config, tmp_path, dtype, mode, expected):
    tiny_config.model.dtype = dtype
    tiny_config.ppo.recompute_old_logprobs = mode
    assert PPOTrainer(tiny_config, tmp_path).recomputes_old_logprobs is expected


@pytest.mark.parametrize(("dtype", "mode", "tol"), [
    ("float32", "never", 1e-5),  # sampling pass and training forward agree to rounding
    ("float32", "always", 1e-5),
    ("bf16-autocast", "auto", 2e-3),  # both old and new log-probs from training-style bf16 forwards
])
def test_ratio_on_the_first_minibatch_is_one(tiny_config, tmp_path, dtype, mode, tol):
    tiny_config.model.dtype = dtype
    tiny_config.ppo.recompute_old_logprobs = mode
    trainer = PPOTrainer(tiny_config, tmp_path)
    tracker = Tracker(tmp_path, [], "t", "t", {})
    rows = [trainer.iteration_step(tracker) for _ in range(2)]  # the second iteration starts from a moved policy
    for row in rows:
        assert row["policy/ratio_first_minibatch"] == pytest.approx(1.0, abs=tol)


def test_train_prints_the_precision_line(tiny_config, tmp_path, capsys):
    tiny_config.model.dtype = "float32"
    tiny_config.train.iterations = 1
    train(tiny_config, tmp_path / "run")
    assert "precision: fp32" in capsys.readouterr().err
