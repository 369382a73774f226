"""Resumable checkpoints, written so that a crash mid-save never leaves a broken "latest".

Layout: RUN_DIR/checkpoints/iter_000010/{policy.safetensors, critic.safetensors, state.pt} and
RUN_DIR/checkpoints/latest (a text file naming the newest complete checkpoint). A checkpoint directory is
built under a temporary name, fsynced, and renamed into place; `latest` is replaced atomically afterwards.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhflab.errors import UserError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters being trained (all of them for full fine-tuning, the adapters for LoRA)."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(run_dir: Path, iteration: int, tensors: dict[str, dict], state: dict, keep: int) -> Path:
    """Save tensor groups (name -> state dict, as safetensors) and a picklable state; prune old ones."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{iteration:06d}"
    final, tmp = root / name, root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for group, tensor_dict in tensors.items():
        save_file(tensor_dict, tmp / f"{group}.safetensors")
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_atomic(root / "latest", name.encode())
    for old in sorted(p for p in root.glob("iter_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise UserError(f"{pointer} names '{path.name}', which is incomplete; delete the pointer to start over")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, dict], dict]:
    tensors = {f.stem: load_file(f) for f in path.glob("*.safetensors")}
    state = torch.load(path / "state.pt", weights_only=False)
    return tensors, state
