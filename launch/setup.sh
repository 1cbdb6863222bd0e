#!/usr/bin/env bash
# Create .venv and install mtbert with everything its tests need (idempotent, ~2 min warm).
# torch first, pinned to the CPU wheel on these machines: an unpinned torch pulls a multi-GB
# CUDA build. DeepSpeed last, without build isolation (else it builds against a CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -c "import torch" 2>/dev/null || pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e ".[wandb,dev]" 2>&1 | grep -v "is ignored" || true
python -c "import deepspeed" 2>/dev/null || pip install -q --no-build-isolation "deepspeed>=0.14" 2>&1 | grep -v "is ignored" || true
python -c "import torch, transformers, accelerate, deepspeed, mtbert; print('mtbert ready: torch', torch.__version__)"
