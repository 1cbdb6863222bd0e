# Shared by the sbatch scripts: run the trainer so that a USR1/TERM from Slurm reaches the
# training processes, and requeue the job when the trainer says it stopped to be resumed.
EXIT_PREEMPTED=75   # mtbert.train.EXIT_PREEMPTED

accelerate_bin() { command -v accelerate || echo "$PWD/.venv/bin/accelerate"; }
job_port() { echo $(( 20000 + ${SLURM_JOB_ID:-0} % 20000 )); }

# signal_ranks SIG: signal this node's training ranks of THIS job: processes running
# mtbert/train.py with our SLURM_JOB_ID in their environment, except the `accelerate launch`
# launcher (it has no USR1 handler and would just die). Safe on nodes shared with other jobs.
signal_ranks() {
  local sig=$1 p
  for p in $(pgrep -f "mtbert/train.py"); do
    tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_JOB_ID=${SLURM_JOB_ID:-none}" || continue
    tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q "accelerate launch" && continue
    kill "-$sig" "$p" 2>/dev/null || true
  done
}

# run_preemptible CMD...: start CMD, forward USR1/TERM to the training ranks, wait, and requeue
# on exit 75. On several nodes set FORWARD_SIGNAL to a command that reaches every node.
run_preemptible() {
  # The trainer exits 75 after a requested stop, but launchers (accelerate, torchrun) turn any
  # worker failure into 1: it also touches this file, which is what we check.
  export MTBERT_STOP_FILE=${TMPDIR:-/tmp}/mtbert-stopped-${SLURM_JOB_ID:-$$}
  rm -f "$MTBERT_STOP_FILE"
  "$@" &
  local pid=$! code
  trap 'echo "[sbatch] signal: asking the trainer to checkpoint"; ${FORWARD_SIGNAL:-signal_ranks USR1}' USR1 TERM
  while :; do
    wait "$pid"; code=$?
    kill -0 "$pid" 2>/dev/null || break   # wait returns early when a trapped signal arrives
  done
  if { [ "$code" = "$EXIT_PREEMPTED" ] || [ -e "$MTBERT_STOP_FILE" ]; } && [ -n "${SLURM_JOB_ID:-}" ]; then
    rm -f "$MTBERT_STOP_FILE"
    echo "[sbatch] checkpoint written; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
  fi
  return "$code"
}
