"""Reward model: a causal LM with a scalar head, trained on preference pairs with the Bradley–Terry loss.

What the reward model reads, for a prompt p and an answer c:

    text = render(p) + c + EOS        tokenized without added special tokens, truncated from the LEFT

`render` is the prompt as the policy saw it (`data.render_prompt`: the chat template with a generation
prompt, or the raw text for `plain`), so the RM scores exactly the text PPO sampled, ended by EOS. Batches
are padded on the RIGHT; the head reads the hidden state at the last real token (the EOS), found as the
last position whose attention mask is 1, with position ids `cumsum(mask) − 1` (so left-padded input gives
the same score too).

Training (`train_reward_model`): r(x) = w·h_last(x) + b; loss −log σ(r(chosen) − r(rejected) − margin)
(`bradley_terry_loss`); a held-out split by prompt; accuracy and a calibration table. After
training, gain/bias normalisation (Ziegler et al. 2019; implementation detail 10): with m, s the mean and
(population) std of r over the calibration set, the score is

    score(x) = gain · r(x) + bias,   gain = 1/s,  bias = −m/s   → mean 0, std 1 on the calibration set.

The calibration set is the reference policy's samples when given (the loop passes the answers it just
sampled from the policy PPO starts from), else every chosen and rejected answer of the training split.

RM_DIR layout (what transformers gives vs our score):
  - When the architecture has a `*ForSequenceClassification` class whose head is one Linear(H, 1) (Llama,
    Mistral, Qwen2, GPT-2...): `AutoModelForSequenceClassification.from_pretrained(RM_DIR)` loads it,
    with the trunk merged (LoRA folded in) and the head weight = gain · w. Its bias-free head (Llama's
    `score`) gives `logits[:, 0] = gain · w·h`, so

        score = logits[:, 0] + hf_offset,   hf_offset = gain · b + bias   (in rlhflab_rm.json)

    — the same ranking and the same differences (so the same Bradley–Terry probabilities), shifted by a
    constant. Feed HF the text above, right-padded (the saved tokenizer pads right); HF pools at the last
    non-pad token. A head with a bias gets the offset folded in and hf_offset = 0.
  - Otherwise: the merged causal LM plus `rm_head.safetensors` (weight gain · w, bias hf_offset).
  - `rlhflab_rm.json`: format, base, prompt_format, max_length, gain, bias, head_bias, hf_offset, metrics,
    calibration table, training settings.

Use it as a reward with the spec `model:RM_DIR` (`rewards.build_reward`) or `load_reward_model(RM_DIR)`.
`model.critic_init: RM_DIR` starts PPO's critic from it.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rlhflab.config import RewardModelConfig
from rlhflab.errors import NonFiniteAbort, Stopped, UserError
from rlhflab.files import atomic_dir, make_dir
from rlhflab.runs.stopping import StopRequests

INFO_FILE = "rlhflab_rm.json"
HEAD_FILE = "rm_head.safetensors"
FORMAT_SEQ_CLS = "sequence-classification"
FORMAT_LM_HEAD = "causal-lm+head"
CALIBRATION_BINS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class PreferencePair:
    """One decided comparison: the prompt (as the reward sees it) and the preferred and dispreferred answer."""

    prompt: str
    chosen: str
    rejected: str


# ---------------------------------------------------------------------------------------------------
# data


def load_preferences(data: str | Path) -> tuple[list[PreferencePair], dict[str, int]]:
    """Decided pairs from a preference DB or a TRL-format JSONL; and how many were left out, by state.

    A DB contributes every pair whose verdict is "a" or "b" (ties, skips, contested and pending pairs are
    left out); a JSONL every `prompt`/`chosen`/`rejected` row (unlabeled `completion_a`/`completion_b` rows
    are left out as pending). Conversational prompts are reduced to their last user message, which is what
    a reward function receives during PPO (`data.Prompt.display`).
    """
    path = Path(data)
    if not path.exists():
        raise UserError(f"preference data '{path}' not found; pass a preference DB or a TRL JSONL file")
    if path.suffix == ".jsonl":
        from rlhflab.preferences.io import read_jsonl

        pairs, left_out = [], {"pending": 0}
        for new in read_jsonl(path):
            if new.choice not in ("a", "b"):
                left_out["pending"] += 1
                continue
            chosen, rejected = (new.a, new.b) if new.choice == "a" else (new.b, new.a)
            pairs.append(PreferencePair(_display(new.prompt, new.messages), chosen.text, rejected.text))
        return pairs, left_out
    from rlhflab.preferences.store import PreferenceStore

    pairs, left_out = [], {}
    with PreferenceStore(path, create=False) as store:
        for verdict in store.verdicts():
            if verdict.choice not in ("a", "b"):
                left_out[verdict.choice] = left_out.get(verdict.choice, 0) + 1
                continue
            p = verdict.pair
            chosen, rejected = (p.a, p.b) if verdict.choice == "a" else (p.b, p.a)
            pairs.append(PreferencePair(_display(p.prompt.text, p.prompt.messages), chosen.text, rejected.text))
    return pairs, left_out


def _display(text: str, messages: list[dict] | None) -> str:
    from rlhflab.data.prompts import Prompt

    return Prompt(messages=messages).display if messages else text


def split_by_prompt(pairs: list[PreferencePair], heldout_fraction: float, seed: int):
    """(train, held-out): whole prompts go to one side, drawn in a seeded order until the fraction is met.

    Splitting by prompt keeps two pairs on the same prompt from sitting on both sides.
    """
    if not 0 <= heldout_fraction < 1:
        raise UserError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    prompts = sorted({p.prompt for p in pairs})
    random.Random(seed).shuffle(prompts)
    want = round(heldout_fraction * len(pairs))
    if heldout_fraction > 0 and len(pairs) >= 2:
        want = max(want, 1)
    held: set[str] = set()
    count = 0
    by_prompt: dict[str, int] = {}
    for p in pairs:
        by_prompt[p.prompt] = by_prompt.get(p.prompt, 0) + 1
    for prompt in prompts:
        if count >= want or count + by_prompt[prompt] >= len(pairs):  # never take every pair
            continue
        held.add(prompt)
        count += by_prompt[prompt]
    return [p for p in pairs if p.prompt not in held], [p for p in pairs if p.prompt in held]


def rm_text(tokenizer, prompt: str, completion: str, prompt_format: str) -> str:
    """The text the reward model reads: the prompt as the policy saw it, the answer, then EOS."""
    from rlhflab.data.prompts import Prompt, render_prompt

    return render_prompt(Prompt(text=prompt), tokenizer, prompt_format) + completion + tokenizer.eos_token


def rm_tokenizer(spec: str):
    from rlhflab.models.loading import load_tokenizer

    tokenizer = load_tokenizer(spec)  # pad ≠ EOS (implementation detail 1)
    tokenizer.padding_side = "right"  # HF's sequence classifiers pool at the last non-pad token
    tokenizer.truncation_side = "left"  # keep the answer's end (the EOS the head reads)
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# the model: trunk + scalar head read at the last real token


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) mask → (B,) index of the last position with mask 1 (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def _trunk(model: nn.Module) -> nn.Module:
    """The transformer stack (returns hidden states) of a causal LM or sequence classifier, LoRA-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference loss −log σ(r_chosen − r_rejected − margin), mean; and the accuracy (r_chosen > r_rejected).

    chosen, rejected (B,) -> (loss, accuracy).
    """
    diff = chosen - rejected
    return -F.logsigmoid(diff - margin).mean(), (diff > 0).float().mean()


class ScalarRewardModel(nn.Module):
    """r(x) = head(h_last(x)): a trunk and a linear head on the hidden state of the last real token."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head  # maps (B, H) -> (B,)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = _trunk(self.backbone)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (B, L, H)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_real_index(attention_mask)]  # (B, H)
        return self.head(last)  # (B,)


class _LinearHead(nn.Module):
    """A loaded head: Linear(H, 1) applied in float32, plus a constant offset."""

    def __init__(self, weight: torch.Tensor, bias: float):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], 1)
        with torch.no_grad():
            self.linear.weight.copy_(weight.float())
            self.linear.bias.fill_(bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)  # (B,)


@torch.no_grad()
def score_texts(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int, max_length: int) -> torch.Tensor:
    """(N,) scores of `texts` in batches, eval mode, no grad; restores the model's training mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        enc = _encode(tokenizer, texts[start : start + batch_size], max_length, device)
        out.append(model(**enc).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def _encode(tokenizer, texts: Sequence[str], max_length: int, device) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                    add_special_tokens=False)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


# ---------------------------------------------------------------------------------------------------
# metrics


def calibration_table(chosen: torch.Tensor, rejected: torch.Tensor) -> list[dict]:
    """Reliability of P(chosen) = σ(r_chosen − r_rejected), binned by the model's confidence.

    chosen, rejected (N,). For each pair the model predicts the answer with the higher score with confidence
    max(p, 1 − p) ∈ [0.5, 1]; a row per confidence bin [lo, hi) ([0.9, 1.0] closed) gives the pairs in it,
    their mean confidence ("predicted") and the share the model got right ("observed"). A calibrated model
    has predicted ≈ observed in every bin. Equal scores count as wrong at confidence 0.5.
    """
    p = torch.sigmoid((chosen - rejected).double())
    confidence = torch.maximum(p, 1 - p)
    correct = (chosen > rejected).double()
    rows = []
    for lo, hi in zip(CALIBRATION_BINS[:-1], CALIBRATION_BINS[1:]):
        inside = (confidence >= lo) & ((confidence < hi) if hi < 1.0 else (confidence <= hi))
        n = int(inside.sum())
        rows.append({
            "bin": f"{lo:.1f}-{hi:.1f}", "pairs": n,
            "predicted": float(confidence[inside].mean()) if n else None,
            "observed": float(correct[inside].mean()) if n else None,
        })  # fmt: skip
    return rows


def expected_calibration_error(table: list[dict]) -> float | None:
    """Σ_bins (pairs/N)·|predicted − observed| over a calibration table."""
    total = sum(row["pairs"] for row in table)
    if not total:
        return None
    return sum(row["pairs"] / total * abs(row["predicted"] - row["observed"]) for row in table if row["pairs"])


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margin: float) -> dict:

    if len(chosen) == 0:
        return {"pairs": 0, "accuracy": None, "loss": None}
    loss, accuracy = bradley_terry_loss(chosen, rejected, margin)
    return {"pairs": len(chosen), "accuracy": float(accuracy), "loss": float(loss)}


# ---------------------------------------------------------------------------------------------------
# training


def train_reward_model(
    data: str | Path,
    out_dir: str | Path,
    config: RewardModelConfig | None = None,
    *,
    seed: int = 0,
    prompt_format: str = "auto",
    calibration: Sequence[tuple[str, str]] | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict:
    """Train a Bradley–Terry reward model on `data` and save it to `out_dir`; returns the metrics dict.

    data: a preference DB (pairs decided a/b) or a TRL JSONL (`prompt`, `chosen`, `rejected`).
    config: the hyper-parameters (None: `RewardModelConfig()`'s defaults); AdamW, linear decay to 0,
    gradient norm clipped to 1. seed: the split, the adapters and the batch order (the caller's RNG state is
    left as it was). prompt_format: how the policy sees prompts (`auto`, `chat`, `plain`).
    calibration: (prompt, answer) samples of the reference policy for the normalisation, at most
    `config.calibration_samples` of them (a seeded sample); default: every chosen and rejected answer of the
    training split. `out_dir` is written atomically and must not exist yet (or be empty).
    """
    from rich.console import Console

    from rlhflab.data.prompts import resolve_prompt_format
    from rlhflab.models.forward import ValueHead
    from rlhflab.models.loading import EMBEDDED, add_lora, load_causal_lm, pick_device
    from rlhflab.runs.seeding import seeded

    c = config or RewardModelConfig()
    base = c.base or EMBEDDED
    console = Console(stderr=True, quiet=quiet)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty; pick another --out for the reward model")
    make_dir(out_dir.parent)  # a bad --out fails now, not after training
    pairs, left_out = load_preferences(data)
    if not pairs:
        raise UserError(f"{data} holds no decided preference pairs (left out: {left_out or 'nothing'}); "
                        "label some with `rlhflab prefs label` or `rlhflab prefs judge`")
    train_pairs, heldout_pairs = split_by_prompt(pairs, c.heldout_fraction, seed)
    lr = c.learning_rate
    started = time.perf_counter()

    dev = pick_device(device)
    # fp32: bf16 weights would round AdamW's small steps away; the normalisation is checked to 1e-4 in fp32
    dtype = torch.float32
    tokenizer = rm_tokenizer(base)
    fmt = resolve_prompt_format(tokenizer, prompt_format, base)

    def texts(rows: list[PreferencePair]) -> tuple[list[str], list[str]]:
        return ([rm_text(tokenizer, p.prompt, p.chosen, fmt) for p in rows],
                [rm_text(tokenizer, p.prompt, p.rejected, fmt) for p in rows])

    console.print(f"reward model: {len(train_pairs)} train / {len(heldout_pairs)} held-out pairs, base {base}, "
                  f"{'LoRA r=' + str(c.lora_r) if c.lora else 'full fine-tuning'}, {c.epochs} epochs, lr {lr:g}")
    history = []
    with seeded(seed, dev), StopRequests("the current batch", "stopping") as stop:
        backbone = load_causal_lm(base, dev, dtype)
        if c.lora:
            backbone = add_lora(backbone, c.lora_r, c.lora_alpha or 2 * c.lora_r, "all-linear")
        head = ValueHead(backbone.config.hidden_size, "linear").to(dev)  # zero-initialised
        # The Bradley–Terry loss only sees score differences, so the head's bias gets no gradient in exact
        # arithmetic; frozen, Adam cannot turn rounding noise into drift. The normalisation sets the offset.
        head.net[0].bias.requires_grad_(False)
        model = ScalarRewardModel(backbone, head)
        params = [p for p in model.parameters() if p.requires_grad]
        steps = c.epochs * math.ceil(len(train_pairs) / c.batch_size)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / steps))
        generator = torch.Generator().manual_seed(seed)
        model.train()
        streak = 0  # optimizer steps in a row skipped for a NaN/inf loss or gradient norm
        for epoch in range(1, c.epochs + 1):
            order = torch.randperm(len(train_pairs), generator=generator).tolist()
            losses, accuracies, skipped_pairs = [], [], []  # skipped_pairs: batch sizes of skipped steps
            for start in range(0, len(order), c.batch_size):
                if stop.requested:  # the model is written whole or not at all: there is no partial one to keep
                    raise Stopped(f"stopped by {stop.signal.name} in epoch {epoch} of {c.epochs}; a reward model "
                                  "is saved only when complete", stop.exit_code, "run the same command again")
                batch = [train_pairs[i] for i in order[start : start + c.batch_size]]
                chosen_texts, rejected_texts = texts(batch)
                enc = _encode(tokenizer, chosen_texts + rejected_texts, c.max_length, dev)
                scores = model(**enc)  # (2b,) chosen first, then rejected
                loss, accuracy = bradley_terry_loss(scores[: len(batch)], scores[len(batch) :], c.margin)
                opt.zero_grad(set_to_none=True)
                finite = bool(torch.isfinite(loss))  # a NaN/inf logit makes the loss NaN/inf
                if finite:
                    loss.backward()
                    finite = math.isfinite(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
                if finite:  # else: no step, AdamW's state untouched; the schedule advances as planned
                    opt.step()
                    losses.append(loss.item() * len(batch))
                    accuracies.append(accuracy.item() * len(batch))
                    streak = 0
                else:
                    skipped_pairs.append(len(batch))
                    streak += 1
                    if streak >= c.nonfinite_patience:
                        raise NonFiniteAbort(
                            f"reward-model training: the loss or gradient norm was NaN/inf in {streak} consecutive "
                            f"steps (last: epoch {epoch}); nothing was saved to {out_dir}; lower rm.lr or check "
                            "the preference data")
                with warnings.catch_warnings():  # a skipped first step advances the schedule before any opt.step()
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                    sched.step()
            n = max(len(train_pairs) - sum(skipped_pairs), 1)  # the pairs of the steps taken
            row = {"epoch": epoch, "loss": sum(losses) / n, "accuracy": sum(accuracies) / n,
                   "skipped_nonfinite": len(skipped_pairs)}
            history.append(row)
            console.print(f"  epoch {epoch}: train loss {row['loss']:.4f}, accuracy {row['accuracy']:.1%} "
                          f"({time.perf_counter() - started:.0f} s)"
                          + (f"; {len(skipped_pairs)} steps skipped for a NaN/inf loss or gradient"
                             if skipped_pairs else ""))

    def evaluate(rows: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen_texts, rejected_texts = texts(rows)
        n = len(rows)
        scores = score_texts(model, tokenizer, chosen_texts + rejected_texts, 2 * c.batch_size, c.max_length)
        return scores[:n], scores[n:]

    train_scores, heldout_scores = evaluate(train_pairs), evaluate(heldout_pairs)
    calibrated_on = "heldout" if heldout_pairs else "train"
    table = calibration_table(*(heldout_scores if heldout_pairs else train_scores))

    # gain/bias normalisation (Ziegler et al. 2019): calibration-set scores get mean 0, std 1
    if calibration:
        # a few hundred answers pin the mean and std to a few per cent; scoring a large round's all costs minutes
        if len(calibration) > c.calibration_samples:
            calibration = random.Random(seed).sample(list(calibration), c.calibration_samples)
        calib_texts = [rm_text(tokenizer, prompt, answer, fmt) for prompt, answer in calibration]
        calibration_source = "reference samples"
    else:
        calib_texts = [t for pair in zip(*texts(train_pairs)) for t in pair]
        calibration_source = "training answers"
    raw = score_texts(model, tokenizer, calib_texts, 2 * c.batch_size, c.max_length).double()
    mean, std = float(raw.mean()), float(raw.std(unbiased=False))
    gain = 1.0 / std if std > 1e-8 else 1.0
    bias = -mean * gain

    info = {
        "base": base,
        "prompt_format": fmt,
        "max_length": c.max_length,
        "input": "render(prompt) + completion + eos_token; no special tokens added; right-padded; "
                 "truncated from the left",
        "gain": gain,
        "bias": bias,
        "normalized_score": "gain * (w·h_last + head_bias) + bias",
        "calibration_source": calibration_source,
        "calibration_samples": len(calib_texts),
        "calibration_raw_mean": mean,
        "calibration_raw_std": std,
        "train": _pair_metrics(*train_scores, c.margin),
        "heldout": _pair_metrics(*heldout_scores, c.margin),
        "accuracy": None,  # filled below: held-out accuracy, or train accuracy without a held-out split
        "calibration_table_on": calibrated_on,
        "calibration_table": table,
        "expected_calibration_error": expected_calibration_error(table),
        "left_out": left_out,
        "history": history,
        "settings": {**c.model_dump(mode="json"), "base": base, "lr": lr, "seed": seed, "data": str(data)},
        "time_s": None,
    }
    info["accuracy"] = info["heldout"]["accuracy"] if heldout_pairs else info["train"]["accuracy"]

    merged = backbone.merge_and_unload() if c.lora else backbone
    w = head.net[0].weight.detach().float().cpu()  # (1, H)
    head_bias = float(head.net[0].bias.detach())
    info["head_bias"] = head_bias
    info["time_s"] = time.perf_counter() - started
    _save(out_dir, merged, tokenizer, w, head_bias, info)
    console.print(f"reward model → {out_dir}: accuracy train {_pct(info['train']['accuracy'])}, "
                  f"held-out {_pct(info['heldout']['accuracy'])}; gain {gain:.4g}, bias {bias:.4g}")
    return info


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _save(out_dir: Path, lm: nn.Module, tokenizer, w: torch.Tensor, head_bias: float, info: dict) -> None:
    """Write RM_DIR in a temp sibling and rename it into place."""
    gain, bias = info["gain"], info["bias"]
    offset = gain * head_bias + bias  # score = gain·w·h + offset

    def build(tmp: Path) -> None:
        cls_model = _as_sequence_classifier(lm, tokenizer.pad_token_id)
        if cls_model is not None:
            model, head_weight, head_bias_param = cls_model
            with torch.no_grad():
                head_weight.copy_((gain * w).to(head_weight.dtype))
                if head_bias_param is not None:
                    head_bias_param.fill_(offset)
            info["format"] = FORMAT_SEQ_CLS
            info["hf_offset"] = 0.0 if head_bias_param is not None else offset
            model.save_pretrained(tmp)
        else:
            from safetensors.torch import save_file

            info["format"] = FORMAT_LM_HEAD
            info["hf_offset"] = None
            lm.save_pretrained(tmp)
            save_file({"weight": (gain * w).contiguous(), "bias": torch.tensor([offset])}, tmp / HEAD_FILE)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    try:
        atomic_dir(out_dir, build)  # replaces the empty directory checked at the start
    except FileExistsError:
        raise UserError(f"{out_dir} was filled while the reward model trained; pick another --out") from None


def _as_sequence_classifier(lm: nn.Module, pad_token_id: int):
    """The trained trunk inside transformers' `*ForSequenceClassification` (num_labels=1), or None when the
    architecture has no such class or its head is not a single Linear(H, 1).

    Returns (model, head weight parameter (1, H), head bias parameter or None).
    """
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    config.architectures = None
    try:
        model = AutoModelForSequenceClassification.from_config(config, dtype=next(lm.parameters()).dtype)
    except (ValueError, KeyError):
        return None
    prefix = model.base_model_prefix
    try:
        getattr(model, prefix).load_state_dict(_trunk(lm).state_dict())
    except (AttributeError, RuntimeError):
        return None
    head = {n: p for n, p in model.named_parameters() if not n.startswith(prefix + ".")}
    weights = [p for n, p in head.items() if n.endswith("weight")]
    biases = [p for n, p in head.items() if n.endswith("bias")]
    if len(weights) != 1 or len(head) != len(weights) + len(biases) or len(biases) > 1:
        return None
    if tuple(weights[0].shape) != (1, lm.config.hidden_size):
        return None
    return model, weights[0], biases[0] if biases else None


# ---------------------------------------------------------------------------------------------------
# loading as a reward


class RewardModel:
    """A trained RM_DIR as a plain reward callable `(prompts, completions, metadata) -> list[float]`.

    Returns normalised scores (mean 0, std 1 on the calibration set), in batches of `batch_size`, without
    gradients, in eval mode. `prompts` are the prompts as a reward function receives them (plain text);
    they are rendered with the prompt format the RM was trained with.
    """

    def __init__(self, rm_dir: str | Path, device: str = "auto", batch_size: int = 16):
        from safetensors.torch import load_file

        from rlhflab.models.loading import load_causal_lm, pick_device

        self.dir = Path(rm_dir)
        info_path = self.dir / INFO_FILE
        if not info_path.is_file():
            raise UserError(f"{self.dir} is not a reward model directory ({INFO_FILE} is missing); "
                            "train one with `rlhflab rm train`")
        self.info = json.loads(info_path.read_text())
        self.batch_size = batch_size
        self.max_length = int(self.info["max_length"])
        self.prompt_format = self.info["prompt_format"]
        dev = pick_device(device)
        dtype = torch.float32  # the precision its normalisation was computed in
        self.tokenizer = rm_tokenizer(str(self.dir))
        if self.info["format"] == FORMAT_SEQ_CLS:
            from transformers import AutoModelForSequenceClassification

            from rlhflab.models.loading import disable_dropout, from_pretrained

            backbone = from_pretrained(AutoModelForSequenceClassification, str(self.dir), dtype=dtype)
            disable_dropout(backbone)
            prefix = backbone.base_model_prefix
            head_params = {n: p for n, p in backbone.named_parameters() if not n.startswith(prefix + ".")}
            weight = next(p for n, p in head_params.items() if n.endswith("weight")).detach()
            hf_bias = sum(float(p) for n, p in head_params.items() if n.endswith("bias"))
            head = _LinearHead(weight, hf_bias + float(self.info["hf_offset"]))
        else:
            backbone = load_causal_lm(str(self.dir), dev, dtype)
            tensors = load_file(self.dir / HEAD_FILE)
            head = _LinearHead(tensors["weight"], float(tensors["bias"]))
        self.model = ScalarRewardModel(backbone, head).to(dev).eval().requires_grad_(False)

    @property
    def gain(self) -> float:
        return float(self.info["gain"])

    @property
    def bias(self) -> float:
        return float(self.info["bias"])

    def texts(self, prompts: Sequence[str], completions: Sequence[str]) -> list[str]:
        return [rm_text(self.tokenizer, p, c, self.prompt_format) for p, c in zip(prompts, completions)]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict] | None = None
                 ) -> list[float]:
        with torch.inference_mode():
            scores = score_texts(self.model, self.tokenizer, self.texts(prompts, completions), self.batch_size,
                                 self.max_length)
        return scores.tolist()


def load_reward_model(rm_dir: str | Path, device: str = "auto", batch_size: int = 16) -> RewardModel:
    """RM_DIR (written by `train_reward_model` / `rlhflab rm train`) → a reward callable of normalised scores."""
    return RewardModel(rm_dir, device=device, batch_size=batch_size)
