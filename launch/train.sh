#!/usr/bin/env bash
# Start a run on this machine with a named launch set-up:
#   launch/train.sh cpu    [overrides...]   1 process (CPU or the one GPU)
#   launch/train.sh cpu2   [overrides...]   2 CPU processes, gloo (what the tests use)
#   launch/train.sh gpu    [overrides...]   1 GPU, bf16
#   launch/train.sh ddp    [overrides...]   all local GPUs, DDP, bf16 (NPROC=N to choose)
#   launch/train.sh zero1|zero2|zero3 [overrides...]   DeepSpeed ZeRO (NPROC=N; 2 CPU ranks without GPUs)
set -euo pipefail
cd "$(dirname "$0")/.."
setup=${1:-cpu}; shift || true
ACCEL=$(command -v accelerate || echo .venv/bin/accelerate)
# GPUs on this machine; 0 without nvidia-smi (a pipeline that fails under pipefail would end
# the script with status 127 and no message).
gpu_count() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  echo "${n:-0}"
}
case $setup in
  cpu)   exec "$ACCEL" launch --num_processes 1 mtbert/train.py "$@" ;;
  cpu2)  cfg=cpu_2proc.yaml; n=2 ;;
  gpu)   cfg=gpu_1.yaml; n=1 ;;
  ddp)   cfg=ddp.yaml; n=${NPROC:-$(gpu_count)} ;;
  zero1|zero2|zero3) cfg=$setup.yaml; n=${NPROC:-$(gpu_count)}; [ "$n" -gt 0 ] || n=2 ;;  # CPU ranks without GPUs
  *) echo "unknown set-up '$setup': cpu, cpu2, gpu, ddp, zero1, zero2, zero3" >&2; exit 2 ;;
esac
[ "$n" -gt 0 ] || { echo "no GPUs found for '$setup' (nvidia-smi lists none); set NPROC=N, or use cpu2" >&2; exit 2; }
exec "$ACCEL" launch --config_file "accelerate_configs/$cfg" --num_processes "$n" mtbert/train.py "$@"
