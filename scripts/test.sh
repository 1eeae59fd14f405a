#!/usr/bin/env bash
# Install mambavl with its test extras (reusing a cached environment when the dependency files are unchanged)
# and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh dev
exec python -m pytest -q "$@"
