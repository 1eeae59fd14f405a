#!/usr/bin/env bash
# Install mambavl with its test extras (reusing a cached environment when the dependency files are unchanged)
# and run the whole test suite. Extra arguments go to pytest. MAMBAVL_TORCH=cpu: PyTorch's CPU-only build (see
# scripts/venv.sh); MAMBAVL_DRY_RUN=1: print the commands instead.
# The test files run in MAMBAVL_TEST_WORKERS worker processes (pytest-xdist, each file whole in one worker, so a
# module's fixtures are built once): by default 2 where 2 or more CPUs are usable, else 0 (one process, no xdist).
# The tests pin torch to one thread each, so 2 workers keep 2 cores busy (on 2 cores: 11.5 min instead of 18.4).
set -euo pipefail
cd "$(dirname "$0")/.."
cpus="$(nproc 2>/dev/null || echo 1)"
workers="${MAMBAVL_TEST_WORKERS:-$([ "$cpus" -ge 2 ] && echo 2 || echo 0)}"
case "$workers" in
    ''|*[!0-9]*) echo "[mambavl] MAMBAVL_TEST_WORKERS=${workers}: expected a whole number (0: no worker processes)" >&2
                 exit 2 ;;
esac
xdist=()
if [ "$workers" -ge 2 ]; then xdist=(-n "$workers" --dist loadfile); fi
source scripts/venv.sh dev
run exec python -m pytest -q ${xdist[@]+"${xdist[@]}"} "$@"
