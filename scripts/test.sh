#!/usr/bin/env bash
# Install mambavl with its test extras (reusing a cached environment when the dependency files are unchanged)
# and run the whole test suite. Extra arguments go to pytest. MAMBAVL_TORCH=cpu: PyTorch's CPU-only build (see
# scripts/venv.sh); MAMBAVL_DRY_RUN=1: print the commands instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh dev
run exec python -m pytest -q "$@"
