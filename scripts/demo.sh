#!/usr/bin/env bash
# The demo: set up, build the demo corpus (gensim's real Wikipedia dump sample), train a
# tokenizer, preprocess, pre-train a small BERT with 2 processes under torchrun, compare the
# methods, then export to Hugging Face transformers and fine-tune on Rotten Tomatoes.
# Under 10 minutes on 2 CPU cores. Outputs go to runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
DATA=data/demo
OUT=${OUT:-runs/demo}
HELDOUT_DOCS=${HELDOUT_DOCS:-6}
# bf16 where the CPU has bf16 instructions (avx512_bf16 / amx_bf16) or on a GPU: 1.8x the tokens/s of
# fp32 for this model on 2 CPU cores (bench: README "Speed on CPU"); PRECISION=fp32 forces fp32.
PRECISION=${PRECISION:-$($PY -c "import torch; from megatron_effmlm.compat.cpu import cpu_bf16_error as e; print('bf16' if torch.cuda.is_available() or not e() else 'fp32')" 2>/dev/null || echo fp32)}
PREC_FLAG=$([ "$PRECISION" = bf16 ] && echo --bf16 || true)
if [ "$PRECISION" = bf16 ]; then
  ITERS=${ITERS:-600}  # past the unigram plateau (150 steps stay on it; bf16 makes 600 cheap)
  COMPARE_STEPS=${COMPARE_STEPS:-30}
  FT_EXAMPLES=${FT_EXAMPLES:-2000}
else
  # fp32 on a CPU without bf16 instructions (an AVX2-only EPYC: 2.1k tokens/s, a fifth of bf16
  # on AVX-512): a fifth of the steps, so that the demo still ends within 10 minutes
  ITERS=${ITERS:-120}
  COMPARE_STEPS=${COMPARE_STEPS:-12}
  FT_EXAMPLES=${FT_EXAMPLES:-1000}
fi

echo "== 1/6 demo corpus (the last $HELDOUT_DOCS articles held out for step 5's evaluation)"
$PY -m megatron_effmlm.data.demo_corpus --data-dir data
[ -f $DATA/heldout.jsonl ] || $PY - $DATA "$HELDOUT_DOCS" <<'EOF'
import os, sys
d, k = sys.argv[1], int(sys.argv[2])
lines = open(os.path.join(d, "wiki.jsonl"), encoding="utf-8").readlines()
for name, part in (("train.jsonl", lines[:-k]), ("heldout.jsonl", lines[-k:])):  # heldout last: it marks done
    with open(os.path.join(d, name + ".tmp"), "w", encoding="utf-8") as f:
        f.writelines(part)
    os.replace(os.path.join(d, name + ".tmp"), os.path.join(d, name))
EOF
echo "== 2/6 tokenizer (WordPiece, vocab 8192)"
[ -f $DATA/tokenizer/effmlm_tokenizer.json ] || \
  $PY tools/train_tokenizer.py --input $DATA/train.jsonl --tokenizer-type wordpiece --vocab-size 8192 \
      --lowercase --output-dir $DATA/tokenizer
echo "== 3/6 preprocess (sentence split, .bin/.idx)"
[ -f $DATA/train_text_sentence.idx ] || \
  $PY tools/preprocess_data.py --input $DATA/train.jsonl --tokenizer-dir $DATA/tokenizer \
      --output-prefix $DATA/train --split-sentences --workers 2
echo "== 4/6 pre-train (vanilla MLM, 4 layers x 256, T=128, 2 processes, data parallel, $PRECISION)"
rm -rf "$OUT"
$PY -m torch.distributed.run --nproc-per-node 2 pretrain_effmlm.py \
  --data-path $DATA/train_text_sentence --tokenizer-dir $DATA/tokenizer --split 98,2,0 \
  --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 128 \
  --micro-batch-size 16 --global-batch-size 32 --train-iters "$ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 20 --lr-decay-style linear --weight-decay 0.01 --clip-grad 1.0 \
  --log-interval 50 --eval-interval $(( ITERS < 400 ? ITERS / 2 : 200 )) --eval-iters 4 \
  --save "$OUT/ckpt" --save-interval 300 --tensorboard-dir "$OUT/tensorboard" --loss-curve "$OUT/loss.png" $PREC_FLAG
echo "== 5/6 every method at equal compute (FLOPs of $COMPARE_STEPS vanilla steps each, LR decayed at that budget),"
echo "        judged by one held-out MLM evaluation (the same masked positions for every model)"
$PY bench/method_quality.py --config demo --vanilla-iters-at-b "$COMPARE_STEPS" --precision "$PRECISION" \
  --data-path $DATA/train_text_sentence --tokenizer-dir $DATA/tokenizer --heldout $DATA/heldout.jsonl \
  --methods vanilla-15 3ml-self token-drop sctd random-ltd --runs-dir "$OUT/methods" --results-dir "$OUT/methods"
echo "(so few steps leave every model near the unigram baseline: this step shows the protocol; the study at"
echo " a budget that learns is bench/method_quality.py, results in bench/results/method_quality_cpu.md)"
echo "== 6/6 export to transformers, fine-tune on Rotten Tomatoes (fresh/rotten, $FT_EXAMPLES training snippets)"
$PY tools/export_hf.py --checkpoint "$OUT/ckpt" --output-dir "$OUT/hf"
$PY - "$OUT/hf" <<'EOF'
import sys, warnings
warnings.filterwarnings("ignore")
import transformers
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline
transformers.utils.logging.disable_progress_bar()
d = sys.argv[1]  # loaded as any Hugging Face model
fill = pipeline("fill-mask", model=AutoModelForMaskedLM.from_pretrained(d), tokenizer=AutoTokenizer.from_pretrained(d))
text = "the first world war began in [MASK] ."
print(text, "->", ", ".join(f"{r['token_str']} ({r['score']:.2f})" for r in fill(text, top_k=5)))
EOF
[ -f data/rotten_tomatoes/dev.tsv ] || \
  $PY tools/rotten_tomatoes_to_glue.py --cache-dir data/cache --output-dir data/rotten_tomatoes
$PY tools/finetune.py --model-dir "$OUT/hf" --data-dir data/rotten_tomatoes --task sst2 --seeds 1 --epochs 3 \
  --lr 2e-4 --max-length 64 --max-train-examples "$FT_EXAMPLES" --log-interval 25 --output "$OUT/finetune.json"
echo
echo "checkpoint:   $OUT/ckpt (latest: $(cat $OUT/ckpt/latest_checkpointed_iteration.txt))"
echo "transformers: $OUT/hf   (AutoModelForMaskedLM.from_pretrained('$OUT/hf'); model card $OUT/hf/README.md)"
echo "fine-tuning:  $OUT/finetune.json"
echo "tensorboard:  $OUT/tensorboard   (tensorboard --logdir $OUT/tensorboard)"
echo "loss curve:   $OUT/loss.png"
echo "methods:      $OUT/methods/method_quality_demo.md, .png (held-out loss at equal compute)"
