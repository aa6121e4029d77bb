#!/usr/bin/env bash
# Sets up .venv (if needed), installs Slurm + munge (if missing) and runs the test suite on CPU
# (torchrun + gloo for the layouts; a local 2-node Slurm cluster for the launchers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/test_slurm.py starts a throw-away Slurm cluster: install Slurm 22.05 + munge if missing
# (needs root and apt; where that is impossible those tests skip and say why).
bash scripts/install_slurm.sh || echo "[test] could not install Slurm: tests/test_slurm.py will skip"
# Two workers (pytest-xdist), each taking whole test files: most tests keep one core busy, and a
# file's module fixtures (the layout runs) are then computed once; the longest files go first
# (tests/conftest.py: LONGEST_FILES). EFFMLM_TEST_WORKERS=0: one process.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 -n "${EFFMLM_TEST_WORKERS:-2}" --dist loadfile \
    --no-loadscope-reorder tests "$@"
