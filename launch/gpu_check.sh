#!/usr/bin/env bash
# The GPU acceptance check (~5-10 minutes on one GPU; mtbert/bench/gpu_check.py says what it runs):
#   bash launch/gpu_check.sh [--out runs/gpu_check] [--methods sum,pcgrad] [--steps 6]
# Prints one table; exit 1 if a row failed, 2 without a GPU (--device cpu: the same plumbing on gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m mtbert.bench.gpu_check "$@"
