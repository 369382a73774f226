#!/usr/bin/env bash
# Creates bench/trl_anchor/.venv with TRL 0.10.1 for the side-by-side anchor benchmark
# (bench/sky_red_speed.py --with-trl). Separate from the project's .venv: TRL 0.10.1 needs transformers 4.x.
# Idempotent: re-running it only checks that the pinned versions are installed.
# Installs the CPU build of torch==2.13.0 first (a plain `torch` pulls a multi-GB CUDA build), then
# requirements.txt under constraints.txt (torch==2.13.0), so no dependency can upgrade torch.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null \
  || pip_install torch==2.13.0
pip_install --constraint constraints.txt -r requirements.txt
.venv/bin/python - <<'PY'
import torch, trl, transformers
assert torch.__version__.startswith("2.13.0"), f"torch was replaced: {torch.__version__}"
assert trl.__version__ == "0.10.1", trl.__version__
print(f"trl_anchor venv ready: trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
PY
