# Shared by the sbatch launchers (sourced by the batch shell): rendezvous address, the
# start-up report, signal forwarding and requeue-on-75. Not a job script itself.

EFFMLM_EXIT_RESUMABLE=75   # pretrain_effmlm.py: saved and stopped on a signal / time limit

effmlm_log() { echo "[effmlm $(date -u +%H:%M:%S)] $*"; }

# The first node of the allocation hosts the rendezvous. Its name must resolve on every node;
# when DNS does not know it, Slurm's NodeAddr for it does.
effmlm_master_addr() {
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  if getent hosts "$first" >/dev/null 2>&1; then echo "$first"; return; fi
  addr=$(scontrol show node "$first" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
  echo "${addr:-$first}"
}

# The value of flag $1 in the rest of the arguments (last one wins), or $2 if absent.
effmlm_flag() {
  local name=$1 default=$2 val=$2; shift 2
  while [ $# -gt 0 ]; do
    if [ "$1" = "$name" ] && [ $# -gt 1 ]; then val=$2; fi
    shift
  done
  echo "$val"
}

# Prints the job, the exact command and the parallel layout it resolves to.
effmlm_report() {  # $1 = world size, rest = training arguments
  local world=$1; shift
  local tp pp dp
  tp=$(effmlm_flag --tensor-model-parallel-size 1 "$@")
  pp=$(effmlm_flag --pipeline-model-parallel-size 1 "$@")
  dp=$(( world / (tp * pp) ))
  effmlm_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NUM_NODES} node(s): $(scontrol show hostnames "$SLURM_JOB_NODELIST" | tr '\n' ' ')"
  effmlm_log "layout: world ${world} = ${SLURM_JOB_NUM_NODES} node(s) x ${GPUS_PER_NODE} process(es); TP ${tp} x PP ${pp} x DP ${dp}; rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
  effmlm_log "command: ${EFFMLM_COMMAND}"
}

# SIGUSR1/SIGTERM reaching this batch shell (#SBATCH --signal=B:USR1@<s>, scancel --batch) are
# recorded from the moment lib.sh is sourced (bash would otherwise die of SIGUSR1) and
# forwarded to the step once it runs (srun passes them to every process of the step).
EFFMLM_GOT_SIGNAL=
EFFMLM_STEP_PID=
effmlm_on_signal() {
  EFFMLM_GOT_SIGNAL=$1
  effmlm_log "batch shell got SIG$1: forwarding it to the training processes"
  [ -n "$EFFMLM_STEP_PID" ] && kill "-$1" "$EFFMLM_STEP_PID" 2>/dev/null
}
trap 'effmlm_on_signal USR1' USR1
trap 'effmlm_on_signal TERM' TERM

# Runs "$@" (an srun line) in the background, forwarding signals to it; waits and returns its
# exit code in EFFMLM_RC.
effmlm_run_forwarding_signals() {
  "$@" &
  EFFMLM_STEP_PID=$!
  local pid=$EFFMLM_STEP_PID
  if [ -n "$EFFMLM_GOT_SIGNAL" ]; then  # arrived before the step existed
    sleep 20  # let the trainer install its handlers (a signal before that would kill it)
    kill "-$EFFMLM_GOT_SIGNAL" "$pid" 2>/dev/null
  fi
  while :; do
    wait "$pid"; EFFMLM_RC=$?
    if [ "$EFFMLM_RC" -le 128 ] || ! kill -0 "$pid" 2>/dev/null; then break; fi
  done
  if [ "$EFFMLM_RC" -gt 128 ]; then  # the trap interrupted wait just as the step ended
    wait "$pid" 2>/dev/null; local again=$?
    [ "$again" != 127 ] && EFFMLM_RC=$again
  fi
}

# Exit code 75 (saved, resumable): requeue this job, which then resumes from --load.
effmlm_requeue_or_exit() {
  local rc=$EFFMLM_RC
  if [ "$rc" -eq "$EFFMLM_EXIT_RESUMABLE" ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "${MAX_RESTARTS:-100}" ]; then
      effmlm_log "training saved and stopped (exit 75) but the job was restarted ${SLURM_RESTART_COUNT} times (MAX_RESTARTS): not requeueing"
      exit "$rc"
    fi
    effmlm_log "training saved and stopped (exit 75): requeueing job ${SLURM_JOB_ID}; it resumes from the latest checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60  # Slurm ends this shell as part of the requeue
    exit "$rc"
  fi
  effmlm_log "training exited with code ${rc}"
  exit "$rc"
}
