"""`rlhflab export`: one run (or, for GGUF, any model spec) → a GGUF file, a PEFT adapter or a Hugging Face
directory with its model card."""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhflab.errors import UserError
from rlhflab.export.adapter import export_adapter
from rlhflab.export.card import write_card
from rlhflab.export.gguf import DTYPES, export_gguf
from rlhflab.files import atomic_dir
from rlhflab.models.loading import resolve_model_dir
from rlhflab.runs.layout import load_run_config

FORMATS = ("gguf", "adapter", "hf")


def final_model_dir(run_dir: Path) -> Path:
    """RUN_DIR/final, the merged model a finished run wrote, or a one-line error saying how to get it."""
    final = run_dir / "final"
    if not (final / "config.json").is_file():
        raise UserError(f"run '{run_dir}' has no final/ model (unfinished run, or train.save_final was off); "
                        f"finish it with: rlhflab train --resume {run_dir}")
    return final


def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    """Copy RUN_DIR/final (a plain Hugging Face model directory, LoRA merged) to `out` with a fresh model card."""
    run_dir, out = Path(run_dir), Path(out)
    final = final_model_dir(run_dir)

    def build(tmp: Path) -> None:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
        write_card(run_dir, tmp)

    try:
        atomic_dir(out, build)
    except FileExistsError:
        raise UserError(f"--out {out} exists and is not empty; pick a new folder") from None
    return out


def export_run(source: str | Path, fmt: str, out: str | Path, dtype: str = "f32") -> Path:
    """Export `source` (a run directory; for gguf also a model directory or spec) as `fmt` to `out`."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt} is not an export format; use one of {', '.join(FORMATS)}")
    if dtype != "f32" and fmt != "gguf":
        raise UserError(f"--dtype applies to --format gguf only ({', '.join(DTYPES)}); {fmt} keeps the run's weights")
    path = Path(source).expanduser()
    is_run = path.is_dir() and (path / "config.yaml").is_file()
    if fmt == "adapter":
        return export_adapter(path, out)
    if fmt == "hf":
        load_run_config(path)  # a one-line error for a folder that is not a run
        return export_hf(path, out)
    if is_run:
        return export_gguf(final_model_dir(path), out, dtype, name=path.resolve().name)
    local = Path(resolve_model_dir(str(source)))
    if not local.is_dir():
        raise UserError(f"'{source}' is neither a run directory nor a local model; GGUF export reads a run, a Hugging "
                        "Face model directory, a .gguf file or the embedded model")
    return export_gguf(local, out, dtype, name=path.name)
