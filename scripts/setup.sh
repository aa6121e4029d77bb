#!/usr/bin/env bash
# Creates .venv under the repo and installs the CPU stack (idempotent: a complete .venv is reused).
# CPU pins live in requirements-cpu.txt; GPU clusters use `pip install -e .[gpu]` with their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, megatron.core, megatron_effmlm, transformers, sentencepiece, nltk, mwxml, pytest, xdist, torchao" 2>/dev/null; then
  exit 0
fi
echo "[setup] creating .venv and installing torch==2.13.0 (CPU), megatron-core==0.16.1 and the rest"
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first: the CPU wheel on this machine; anything that pulls torch later finds it satisfied.
.venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -r requirements-cpu.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, megatron.core; print('[setup] torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
