#!/usr/bin/env bash
# One task per node (started by slurm/pretrain_torchrun.sbatch through srun): torchrun with this
# node's rank. torchrun handles SIGUSR1 as well as SIGTERM (forwards it to its workers and waits
# for them to save); its own exit code for any failing worker is 1, so the trainer's code (75 =
# saved and resumable) comes back through EFFMLM_EXIT_CODE_FILE.
set -uo pipefail
export EFFMLM_EXIT_CODE_FILE="${TMPDIR:-/tmp}/effmlm-exit-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}-${SLURM_NODEID}"
rm -f "$EFFMLM_EXIT_CODE_FILE"
trap ':' USR1 TERM   # Slurm signals every process of the step; this shell only waits
read -r -a TORCHRUN_CMD <<< "${TORCHRUN:-torchrun}"
SIGNAL_FLAGS=()
if "${TORCHRUN_CMD[@]}" --help 2>/dev/null | grep -q -- --signals-to-handle; then  # torch >= 2.8
  SIGNAL_FLAGS=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-900}")
else
  echo "[effmlm] warning: this torchrun cannot forward SIGUSR1 (no --signals-to-handle); use #SBATCH --signal=B:TERM@<s> or the srun launcher" >&2
fi
"${TORCHRUN_CMD[@]}" \
  --nnodes "$SLURM_JOB_NUM_NODES" --node-rank "$SLURM_NODEID" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "${SIGNAL_FLAGS[@]}" \
  "$@" &
pid=$!
while :; do
  wait "$pid"; rc=$?
  if [ "$rc" -le 128 ] || ! kill -0 "$pid" 2>/dev/null; then break; fi
done
if [ -s "$EFFMLM_EXIT_CODE_FILE" ]; then
  rc=$(cat "$EFFMLM_EXIT_CODE_FILE"); rm -f "$EFFMLM_EXIT_CODE_FILE"
fi
echo "[effmlm] node ${SLURM_NODEID} ($(hostname)): training exited with code ${rc}"
exit "$rc"
