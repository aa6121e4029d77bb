# BERT-large (24 x 1024, 16 heads, T = 512, WordPiece) -- source this (the launchers do): sets EFFMLM_ARGS for pretrain_effmlm.py.
#   one node:      METHOD=sctd DATA=... TOK=... bash examples/pretrain_one_node.sh examples/configs/bert_large.sh
#   several nodes: METHOD=sctd DATA=... TOK=... sbatch --nodes 4 slurm/pretrain_torchrun.sbatch examples/configs/bert_large.sh
# Not in the papers (docs/methods.md): BERT's recipe (batch 256 -> here 512 as token dropping, lr 1e-4, 1M steps); random-LTD 128 -> 512 as DeepSpeed's BERT-large.
# DATA: a preprocess_data.py prefix or a blend "0.7 a 0.3 b"; TOK: a train_tokenizer.py directory.
# The global batch is fixed; MICRO_BATCH per process (gradient accumulation fills the rest).
: "${DATA:?set DATA to a --data-path prefix (or a blend)}" "${TOK:?set TOK to a --tokenizer-dir}"
OUT=${OUT:-runs/bert_large_${METHOD:-vanilla}}
LTD_STEPS=${LTD_STEPS:-200000}
source "$(dirname "${BASH_SOURCE[0]}")/methods.sh" || return 2
EFFMLM_ARGS=(
  --data-path $DATA --tokenizer-dir "$TOK" --split 949,50,1
  --num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 512
  --micro-batch-size "${MICRO_BATCH:-8}" --global-batch-size "${GLOBAL_BATCH:-512}" --train-iters "${TRAIN_ITERS:-1000000}"
  --lr "${LR:-1e-4}" --min-lr 0 --lr-decay-style linear --lr-warmup-iters "${WARMUP:-10000}" --weight-decay 0.01 --clip-grad 1.0
  --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-6 --bf16
  --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
  --log-interval 100 --eval-interval 5000 --eval-iters 20
  --save "$OUT/ckpt" --load "$OUT/ckpt" --save-interval 5000 --tensorboard-dir "$OUT/tb"
  --exit-signal-handler --peak-tflops "${PEAK_TFLOPS:-989}"
  "${METHOD_ARGS[@]}"
)
