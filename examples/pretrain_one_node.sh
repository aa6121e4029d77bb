#!/usr/bin/env bash
# One node, one torchrun: GPUS processes (default 8) with a config from examples/configs/.
#   METHOD=token-drop DATA=data/wiki_text_sentence TOK=tok bash examples/pretrain_one_node.sh examples/configs/bert_base.sh [extra flags]
# METHOD: vanilla | 3ml | token-drop | sctd | random-ltd. Several nodes: slurm/pretrain_torchrun.sbatch.
# Exit code 75 means "saved on SIGTERM/SIGUSR1 or --exit-duration-in-mins": run it again to resume.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: examples/pretrain_one_node.sh examples/configs/<model>.sh [extra flags]}; shift
GPUS_PER_NODE=${GPUS:-8}; NNODES=1; WORLD_SIZE=$GPUS_PER_NODE
source "$CONFIG"
CMD=(${PYTHON:-python} -m torch.distributed.run --standalone --nproc-per-node "$GPUS_PER_NODE"
     pretrain_effmlm.py "${EFFMLM_ARGS[@]}" "$@")
echo "command: $(printf '%q ' "${CMD[@]}")"
exec "${CMD[@]}"
