"""Resumable checkpoints without pickle, written so that a crash mid-save never leaves a broken "latest".

Layout: RUN_DIR/checkpoints/iter_000010/ holds one `GROUP.safetensors` per weight group (policy, critic, ...),
`state.safetensors` (every tensor of the training state: optimizer moments, RNG states) and `state.json` (the
rest, with each tensor replaced by {"$tensor": KEY} naming it in state.safetensors). `state.json` is written
last: a checkpoint without it is incomplete. The directory is built under a temporary name, fsynced and renamed
into place; RUN_DIR/checkpoints/latest (a text file naming the newest complete checkpoint) is replaced after.
Loading reads only safetensors and JSON, so a checkpoint file can never run code.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhflab.errors import UserError
from rlhflab.files import atomic_dir, write_atomic

STATE_JSON = "state.json"  # the completion marker: written after every other file
STATE_TENSORS = "state.safetensors"
OLD_STATE = "state.pt"  # the pickled state of rlhflab before this format
TENSOR_REF = "$tensor"


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters being trained (all of them for full fine-tuning, the adapters for LoRA)."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`obj` (nested dicts with str keys, lists, tuples, JSON scalars, tensors) as JSON, its tensors moved into
    `tensors` under their dotted path. Tuples come back as lists."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {TENSOR_REF: path}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"checkpoint state at '{path}' has non-string keys; JSON would turn them into strings")
        return {k: split_tensors(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj)]
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `split_tensors`."""
    if isinstance(obj, dict):
        if set(obj) == {TENSOR_REF}:
            return tensors[obj[TENSOR_REF]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict with its per-parameter state as a list (JSON has no integer keys)."""
    sd = optimizer.state_dict()
    return {"param_groups": sd["param_groups"], "state": [{"param": i, **s} for i, s in sd["state"].items()]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    state = {s["param"]: {k: v for k, v in s.items() if k != "param"} for s in saved["state"]}
    optimizer.load_state_dict({"param_groups": saved["param_groups"], "state": state})


def rng_state() -> dict:
    """Every random stream a run draws from: torch (CPU and each CUDA device), Python's and NumPy's."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached_gaussian],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        # a run resumed on fewer devices (or on the CPU) never draws from the missing ones
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))


def save_checkpoint(run_dir: Path, iteration: int, tensors: dict[str, dict], state: dict, keep: int) -> Path:
    """Save weight groups (name -> tensors, one safetensors file each) and the training `state` (see
    `split_tensors`); point `latest` at it; keep the newest `keep` checkpoints."""
    root = run_dir / "checkpoints"
    name = f"iter_{iteration:06d}"
    state_tensors: dict[str, torch.Tensor] = {}
    state_json = json.dumps(split_tensors(state, state_tensors), indent=1)

    def build(tmp: Path) -> None:
        for group, tensor_dict in tensors.items():
            save_file(tensor_dict, tmp / f"{group}.safetensors")
        save_file(state_tensors, tmp / STATE_TENSORS)
        (tmp / STATE_JSON).write_text(state_json)

    final = root / name
    pointer = root / "latest"
    # a run resumed here and not stepped since: the checkpoint `latest` names already holds this state
    if not (pointer.is_file() and pointer.read_text().strip() == name and (final / STATE_JSON).is_file()):
        if final.is_dir():
            shutil.rmtree(final)  # saved but never pointed at (killed before `latest` moved): not one to keep
        atomic_dir(final, build)
        write_atomic(pointer, name)
    for old in sorted(p for p in root.glob("iter_*") if p.is_dir())[:-keep]:  # beyond `keep`
        shutil.rmtree(old, ignore_errors=True)
    remove_partial_checkpoints(run_dir)
    return final


def remove_partial_checkpoints(run_dir: Path) -> int:
    """Delete half-built checkpoints a killed process left under their temporary name. -> how many."""
    partial = list((run_dir / "checkpoints").glob(".iter_*.tmp"))
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    return len(partial)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if (path / OLD_STATE).is_file() and not (path / STATE_JSON).is_file():
        raise UserError(f"{path} is a checkpoint of an older rlhflab (pickled {OLD_STATE}), which this version "
                        "does not load; finish the run with the rlhflab that wrote it, or start afresh with a new --out")
    if not (path / STATE_JSON).is_file():
        raise UserError(f"{pointer} names '{path.name}', which is incomplete; delete the pointer to start over")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, dict], dict]:
    """(weight groups, training state) as `save_checkpoint` wrote them."""
    tensors = {f.stem: load_file(f) for f in path.glob("*.safetensors") if f.name != STATE_TENSORS}
    state = join_tensors(json.loads((path / STATE_JSON).read_text()), load_file(path / STATE_TENSORS))
    return tensors, state
