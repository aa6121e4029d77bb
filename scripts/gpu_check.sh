#!/usr/bin/env bash
# The GPU checks in one go: what the machine has, the GPU tests (tests/test_gpu.py), and the
# throughput benchmark (bench/gpu_throughput.py). Logs and results go to $OUT (default
# bench/results/gpu_check). Uses the current python3 (a GPU machine brings its own torch);
# wheels in .whl/ (megatron-core, nltk for a machine without an index) are installed first.
#   bash scripts/gpu_check.sh                 # tests + BERT-base/large benchmark
#   GPU_CHECK_BENCH_ARGS="--shapes bert-base" bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY - <<'EOF'
import torch, megatron.core
from megatron_effmlm.model.backends import select_backends, fp8_status, apex_status
print("torch", torch.__version__, "cuda", torch.version.cuda, "| megatron-core", megatron.core.__version__)
print("kernels:", select_backends().summary())
print("fp8:", fp8_status(), "| apex:", apex_status())
EOF
} 2>&1 | tee "$OUT/env.txt"
EFFMLM_TEST_GPU=1 timeout ${GPU_CHECK_TEST_TIMEOUT:-300} $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py \
  2>&1 | tee "$OUT/gpu_tests.log"
timeout ${GPU_CHECK_BENCH_TIMEOUT:-400} $PY bench/gpu_throughput.py --results-dir "$OUT" ${GPU_CHECK_BENCH_ARGS:-} \
  2>&1 | tee "$OUT/gpu_throughput.log"
