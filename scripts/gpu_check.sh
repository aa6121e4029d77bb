#!/usr/bin/env bash
# The GPU checks in one go, each under its own timeout (under 9 minutes of device time in all, one
# device command): what the machine has, the GPU tests (tests/test_gpu.py), the per-method
# profile (bench/profile_step.py: all methods, BERT-base, bf16), the throughput benchmark
# (bench/gpu_throughput.py, no dropout) with padded SDPA ("bench") and with packed live tokens
# ("packed": torch's varlen_attn, no padding mask) and, where torchao is installed or carried in
# .whl/, FP8 against bf16 at BERT-large ("fp8"; "fp8c": the same under torch.compile, not default). Logs and results go to $OUT (default bench/results/gpu_check). Uses the current
# python3 (a GPU machine brings its own torch); wheels in .whl/ (megatron-core, torchao, nltk for
# a machine without an index) are installed first.
#   bash scripts/gpu_check.sh                 # everything
#   GPU_CHECK_BENCH_ARGS="--shapes bert-base" bash scripts/gpu_check.sh
#   GPU_CHECK_STEPS="tests profile" bash scripts/gpu_check.sh      # only some steps (default below)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-"tests profile bench packed fp8"}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
want() { [[ " $STEPS " == *" $1 "* ]]; }
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 60 $PY - <<'EOF'
import torch, megatron.core
from megatron_effmlm.model.backends import select_backends, fp8_status, apex_status
print("torch", torch.__version__, "cuda", torch.version.cuda, "| megatron-core", megatron.core.__version__)
print("kernels:", select_backends().summary())
print("fp8 (auto spec):", fp8_status(), "| fp8 (local spec):", fp8_status("local"),
      "| rowwise:", fp8_status("local", "e4m3", "rowwise"), "| apex:", apex_status())
EOF
} 2>&1 | tee "$OUT/env.txt"
want tests && EFFMLM_TEST_GPU=1 timeout ${GPU_CHECK_TEST_TIMEOUT:-120} $PY -m pytest -q -p no:cacheprovider -rs \
  tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
# where the step time goes, per method (attention, GEMMs, head + loss, index ops, optimizer, idle)
want profile && timeout ${GPU_CHECK_PROFILE_TIMEOUT:-80} $PY bench/profile_step.py --shape bert-base --precision bf16 \
  --results-dir "$OUT" 2>&1 | tee "$OUT/profile_step.log"
# before / after packing: the same run with padded SDPA and with packed live tokens (varlen_attn has
# no dropout, so neither run has any)
want bench && timeout ${GPU_CHECK_BENCH_TIMEOUT:-110} $PY bench/gpu_throughput.py --precisions bf16 --warmup 2 --steps 6 \
  --dropout 0 --attention-backend sdpa --tag padded --results-dir "$OUT" ${GPU_CHECK_BENCH_ARGS:-} \
  2>&1 | tee "$OUT/gpu_throughput_padded.log"
want packed && timeout ${GPU_CHECK_PACKED_TIMEOUT:-110} $PY bench/gpu_throughput.py --precisions bf16 --warmup 2 --steps 6 \
  --dropout 0 --attention-backend varlen --tag packed --results-dir "$OUT" ${GPU_CHECK_BENCH_ARGS:-} \
  2>&1 | tee "$OUT/gpu_throughput_packed.log"
# FP8 (torchao's float8 GEMMs in the local spec, or TE's where installed) against bf16, BERT-large;
# then torchao's FP8 under torch.compile (eager runs each amax / scale / cast as its own kernel)
if $PY -c "import torchao" >/dev/null 2>&1; then
  want fp8 && timeout ${GPU_CHECK_FP8_TIMEOUT:-60} $PY bench/gpu_throughput.py --shapes bert-large --precisions bf16,fp8 \
    --methods vanilla --warmup 2 --steps 6 --tag fp8 --results-dir "$OUT" 2>&1 | tee "$OUT/gpu_throughput_fp8.log"
  want fp8c && timeout ${GPU_CHECK_FP8_COMPILE_TIMEOUT:-80} $PY bench/gpu_throughput.py --shapes bert-large --precisions fp8 \
    --fp8-compile --transformer-impl local --methods vanilla --warmup 3 --steps 6 --tag fp8_compiled \
    --results-dir "$OUT" 2>&1 | tee "$OUT/gpu_throughput_fp8_compiled.log"
fi
