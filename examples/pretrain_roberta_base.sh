#!/usr/bin/env bash
# RoBERTa-base (12 x 768, T = 512, byte-level BPE, full-sentence packing) on one 8-GPU node.
# RoBERTa's recipe: batch 8k, peak lr 6e-4, 500k steps (here batch 2048 / 125k steps, same tokens
# per the 3ML paper's budget accounting); METHOD as in pretrain_bert_base.sh.
set -euo pipefail
METHOD=${METHOD:-vanilla}
DATA=${DATA:?set DATA}; TOK=${TOK:?set TOK (tools/train_tokenizer.py --tokenizer-type bpe)}
OUT=${OUT:-runs/roberta_base_$METHOD}
case "$METHOD" in
  3ml) EXTRA=(--method 3ml --decoder-layers 2 --mask-prob 0.5) ;;
  token-drop) EXTRA=(--method token-drop) ;;
  sctd) EXTRA=(--method sctd) ;;
  random-ltd) EXTRA=(--method random-ltd --ltd-start 128 --ltd-steps 60000) ;;
  *) EXTRA=() ;;
esac
torchrun --nproc-per-node ${GPUS:-8} pretrain_effmlm.py \
  --data-path $DATA --tokenizer-dir "$TOK" --split 949,50,1 \
  --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 512 \
  --micro-batch-size 32 --global-batch-size 2048 --train-iters 125000 \
  --lr 6e-4 --lr-decay-style linear --lr-warmup-iters 10000 --weight-decay 0.01 --clip-grad 0.0 \
  --adam-beta1 0.9 --adam-beta2 0.98 --adam-eps 1e-6 --bf16 \
  --log-interval 100 --eval-interval 2000 --eval-iters 20 \
  --save "$OUT/ckpt" --load "$OUT/ckpt" --save-interval 2000 --tensorboard-dir "$OUT/tb" \
  --peak-tflops 989 "${EXTRA[@]}" "$@"
