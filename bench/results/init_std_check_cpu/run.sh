#!/bin/bash
# fp32 check of --init-method-std on the cpu study's model, data and budget schedule (vanilla-15 at B),
# stopped early with --exit-interval: does a larger init leave the unigram plateau sooner?
cd /work/main
NAME=$1; STD=$2; EXIT=${3:-800}
OMP_NUM_THREADS=1 .venv/bin/python pretrain_effmlm.py --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 128 \
  --data-path data/corpus/train_text_sentence --tokenizer-dir bench/results/method_quality_cpu_tokenizer \
  --micro-batch-size 16 --global-batch-size 32 --lr 0.001 --min-lr 1e-05 --lr-decay-style linear --lr-warmup-fraction 0.06 \
  --split 98,2,0 --seed 1234 --data-cache-path runs/initcheck/data_cache --method vanilla --mask-prob 0.15 \
  --train-flops-budget 4.582067e+14 --train-iters 15010 --exit-interval $EXIT \
  --eval-interval 100 --eval-iters 10 --log-interval 25 --init-method-std $STD \
  --loss-curve runs/initcheck/$NAME.curve.json --summary-json runs/initcheck/$NAME.summary.json > runs/initcheck/$NAME.log 2>&1
