# A tiny model for CPU smoke tests of the launchers (gloo): 2 layers x 64, T = 64, demo data.
#   DATA=data/test_cache/demo_wp_text_sentence TOK=data/test_cache/tokenizer_wordpiece_4096 \
#     sbatch --nodes 2 --gpus-per-node=0 --partition=debug slurm/pretrain_torchrun.sbatch examples/configs/tiny_cpu.sh
: "${DATA:?set DATA}" "${TOK:?set TOK}"
OUT=${OUT:-runs/tiny_cpu_${METHOD:-vanilla}}
source "$(dirname "${BASH_SOURCE[0]}")/methods.sh" || return 2
[ "${METHOD:-vanilla}" = random-ltd ] && METHOD_ARGS=(--method random-ltd --ltd-start 16 --ltd-steps 20)
EFFMLM_ARGS=(
  --data-path $DATA --tokenizer-dir "$TOK" --split 98,2,0
  --num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 64
  --micro-batch-size 2 --global-batch-size "${GLOBAL_BATCH:-8}" --train-iters "${TRAIN_ITERS:-20}" --lr 1e-3
  --log-interval 1 --save "$OUT/ckpt" --load "$OUT/ckpt" --save-interval "${SAVE_INTERVAL:-0}"
  --exit-signal-handler --loss-curve "$OUT/loss_restart${SLURM_RESTART_COUNT:-0}.png"
  "${METHOD_ARGS[@]}"
)
