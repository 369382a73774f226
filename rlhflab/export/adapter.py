"""A LoRA run's adapter as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors + model card),
which `PeftModel.from_pretrained(base, DIR)` loads onto the base model."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhflab.errors import UserError
from rlhflab.export.card import hub_base_model, write_card
from rlhflab.files import atomic_dir
from rlhflab.models.loading import load_causal_lm, with_lora
from rlhflab.runs.checkpoint import latest_checkpoint, load_checkpoint
from rlhflab.runs.layout import load_run_config


def export_adapter(run_dir: str | Path, out: str | Path) -> Path:
    """Write the adapter of `run_dir`'s latest checkpoint (the weights final/ was merged from) to the folder `out`."""
    run_dir, out = Path(run_dir), Path(out)
    config = load_run_config(run_dir)
    lora = config.model.lora
    if not lora.enabled:
        raise UserError(f"{run_dir} trained every weight (model.lora.enabled is false in its config.yaml), so it has "
                        "no adapter; export it with --format hf or --format gguf")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise UserError(f"{run_dir} has no checkpoint yet (checkpoints/latest is missing); train it first: "
                        f"rlhflab train --resume {run_dir}")
    tensors, _ = load_checkpoint(checkpoint)
    model = with_lora(load_causal_lm(config.model.name, torch.device("cpu"), torch.float32), lora)
    result = model.load_state_dict(tensors["policy"], strict=False)
    if result.unexpected_keys:  # missing keys are the frozen base weights, not saved in a LoRA checkpoint
        raise UserError(f"{checkpoint} does not match the LoRA settings in {run_dir / 'config.yaml'} "
                        f"(e.g. {result.unexpected_keys[0]}); was the config edited after training?")
    # where a user finds the base: the Hub id where one is known, else the spec the run was trained on
    model.peft_config["default"].base_model_name_or_path = hub_base_model(config.model.name) or config.model.name

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp, save_embedding_layers=False)  # "auto" would look the base up online
        write_card(run_dir, tmp, library_name="peft")  # replaces the template card peft writes

    try:
        atomic_dir(out, build)
    except FileExistsError:
        raise UserError(f"--out {out} exists and is not empty; pick a new folder") from None
    return out
