# Shared by the sbatch scripts: run the trainer so that a stop request from Slurm (USR1 to the
# batch shell, `scancel --signal=...`, a job-wide SIGTERM at preemption) reaches the training
# ranks and nothing else, and requeue the job when the trainer says it stopped to be resumed.
EXIT_PREEMPTED=75   # mtbert.train.EXIT_PREEMPTED

accelerate_bin() { command -v accelerate || echo "$PWD/.venv/bin/accelerate"; }
job_port() { echo $(( 20000 + ${SLURM_JOB_ID:-0} % 20000 )); }

# Threads per rank: the CPUs Slurm gave this task, shared by the ranks it starts.
threads_per_rank() { local n=$(( ${SLURM_CPUS_PER_TASK:-1} / ${1:-1} )); echo $(( n > 0 ? n : 1 )); }

# launcher_shielded CMD...: run CMD (accelerate launch) deaf to TERM and USR1. Ignored signals
# stay ignored across exec, and torch elastic is told not to install its own TERM handler
# (PET_SIGNALS_TO_HANDLE): a launcher that dies or tears its workers down on a job-wide TERM
# kills the ranks mid-checkpoint (they die with it: mtbert/training/process.py). The ranks install
# their own handlers first thing; the launcher exits when they have checkpointed and exited.
# Use it as `launcher_shielded CMD... &`: the background subshell itself execs CMD, so $! is the
# launcher (a wrapping shell would die of the TERM and make the wait below end too early).
launcher_shielded() {
  trap '' TERM USR1
  export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
  exec "$@"
}

# signal_ranks SIG: signal this node's training ranks of THIS job: processes running
# mtbert/train.py with our SLURM_JOB_ID in their environment, except the `accelerate launch`
# launchers. Safe on nodes shared with other jobs.
signal_ranks() {
  local sig=$1 p
  for p in $(pgrep -f "mtbert/train.py"); do
    tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "SLURM_JOB_ID=${SLURM_JOB_ID:-none}" || continue
    tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q "accelerate launch" && continue
    kill "-$sig" "$p" 2>/dev/null || true
  done
}

# run_preemptible CMD...: start CMD (shielded), forward a USR1/TERM of the batch shell to the
# training ranks (FORWARD_SIGNAL reaches every node of a multi-node job), wait for CMD to end,
# and requeue when the trainer wrote the stop file (or exited 75). A stop request that ended
# without that confirmation is requeued too: with `scancel --full` or at preemption srun gets
# the TERM as well and kills its step at once (Slurm's srun does that for TERM/HUP/QUIT), so
# the ranks die before they can checkpoint; the run resumes from its newest complete one.
run_preemptible() {
  # The trainer exits 75 after a requested stop, but launchers (accelerate, torchrun) turn any
  # worker failure into 1: the main rank also writes this file before its ranks exit.
  export MTBERT_STOP_FILE=${MTBERT_STOP_FILE:-${TMPDIR:-/tmp}/mtbert-stopped-${SLURM_JOB_ID:-$$}}
  rm -f "$MTBERT_STOP_FILE"
  ( launcher_shielded "$@" ) &
  local pid=$! code asked=0
  trap 'asked=1; echo "[sbatch] signal: asking the trainer to checkpoint"; eval "${FORWARD_SIGNAL:-signal_ranks USR1}"' USR1 TERM
  while :; do
    wait "$pid"; code=$?
    kill -0 "$pid" 2>/dev/null || break   # wait returns early when a trapped signal arrives
  done
  [ -n "${SLURM_JOB_ID:-}" ] || return "$code"
  if [ "$code" = "$EXIT_PREEMPTED" ] || [ -e "$MTBERT_STOP_FILE" ]; then
    echo "[sbatch] checkpoint written; requeueing job $SLURM_JOB_ID"
  elif [ "$asked" = 1 ]; then
    echo "[sbatch] stopped by a signal before the trainer confirmed a checkpoint (exit $code); requeueing" \
         "job $SLURM_JOB_ID to resume from the newest complete checkpoint"
  else
    return "$code"
  fi
  rm -f "$MTBERT_STOP_FILE"
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  return "$code"
}
