#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the test suite on CPU (torchrun + gloo for the layouts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"
