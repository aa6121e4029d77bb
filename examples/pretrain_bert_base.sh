#!/usr/bin/env bash
# BERT-base (12 x 768, T = 512) on one 8-GPU node; METHOD=vanilla|3ml|token-drop|sctd|random-ltd.
# DATA: a preprocess_data.py prefix (or a blend "0.7 a 0.3 b"), TOK: a train_tokenizer.py directory.
# Hyper-parameters: the token-dropping paper's (batch 512, AdamW 1e-4, T = 512); 3ML masks 50%.
set -euo pipefail
METHOD=${METHOD:-vanilla}
DATA=${DATA:?set DATA to a --data-path prefix}
TOK=${TOK:?set TOK to a --tokenizer-dir}
OUT=${OUT:-runs/bert_base_$METHOD}
case "$METHOD" in
  3ml) EXTRA=(--method 3ml --decoder-layers 2) ;;   # --mask-prob 0.5, no 80/10/10 by default
  token-drop) EXTRA=(--method token-drop --td-keep-ratio 0.5 --td-beta 0.995) ;;
  sctd) EXTRA=(--method sctd --sctd-interval 10 --td-beta 0.95) ;;
  random-ltd) EXTRA=(--method random-ltd --ltd-start 128 --ltd-steps 200000 --ltd-granularity 16) ;;
  *) EXTRA=() ;;
esac
torchrun --nproc-per-node ${GPUS:-8} pretrain_effmlm.py \
  --data-path $DATA --tokenizer-dir "$TOK" --split 949,50,1 \
  --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 512 \
  --micro-batch-size 64 --global-batch-size 512 --train-iters 1000000 \
  --lr 1e-4 --min-lr 0 --lr-decay-style linear --lr-warmup-iters 10000 --weight-decay 0.01 --clip-grad 1.0 \
  --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-6 --bf16 \
  --log-interval 100 --eval-interval 5000 --eval-iters 20 \
  --save "$OUT/ckpt" --load "$OUT/ckpt" --save-interval 5000 --tensorboard-dir "$OUT/tb" \
  --peak-tflops 989 "${EXTRA[@]}" "$@"
