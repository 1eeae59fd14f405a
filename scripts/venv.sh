#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install mambavl into it.
# Sourced by scripts/demo.sh and scripts/test.sh. Usage: source scripts/venv.sh [EXTRAS]
#
# The environment is keyed by a hash of the dependency files, so a second run on the same machine reuses it
# (seconds instead of minutes); a change to pyproject.toml or the constraints builds a fresh one.
# Set MAMBAVL_VENV to choose the location yourself.
#
# MAMBAVL_TORCH=cpu installs PyTorch's CPU-only build from PyTorch's CPU index (MAMBAVL_TORCH_INDEX overrides the
# address, e.g. a mirror) instead of PyPI's default build, which brings ~4 GB of CUDA libraries on Linux; it gets its
# own environment (venv-<hash>-cpu). Unset, nothing changes: PyPI's build, as CI installs it.
# MAMBAVL_DRY_RUN=1 prints the commands (one per line, after "+ ") instead of running them.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
python="${PYTHON:-python3}"
torch_index=()
variant=""
case "${MAMBAVL_TORCH:-}" in
    "") ;;
    cpu) torch_index=(--index-url "${MAMBAVL_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"); variant="-cpu" ;;
    *) echo "[mambavl] MAMBAVL_TORCH=${MAMBAVL_TORCH}: expected cpu, or unset for PyPI's default build" >&2
       return 2 2>/dev/null || exit 2 ;;
esac
run() {
    if [ -n "${MAMBAVL_DRY_RUN:-}" ]; then
        echo "+ $*" >&2
    else
        "$@"
    fi
}
key="$(cat "$repo/pyproject.toml" "$repo/scripts/constraints-dev.txt" | sha256sum | cut -c1-16)"
venv="${MAMBAVL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mambavl/venv-$key$variant}"
stamp="$venv/.mambavl-installed${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
    echo "[mambavl] installing into $venv (first run: a few minutes)" >&2
    run "$python" -m venv "$venv"
    run "$venv/bin/python" -m pip install -q --upgrade pip >&2
    # torch first, pinned for this build path, so nothing below pulls another build
    run "$venv/bin/python" -m pip install -q ${torch_index[@]+"${torch_index[@]}"} -c "$repo/scripts/constraints-dev.txt" \
        torch torchvision >&2
    run "$venv/bin/python" -m pip install -q -c "$repo/scripts/constraints-dev.txt" \
        -e "$repo${extras:+[$extras]}" >&2
    run touch "$stamp"
else
    # the venv is shared between clones: point the editable install at this checkout (no dependency changes)
    run "$venv/bin/python" -m pip install -q --no-deps -e "$repo" >&2
fi
export PATH="$venv/bin:$PATH"
export MAMBAVL_VENV="$venv"
