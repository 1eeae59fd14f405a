#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install mambavl into it.
# Sourced by scripts/demo.sh and scripts/test.sh. Usage: source scripts/venv.sh [EXTRAS]
#
# The environment is keyed by a hash of the dependency files, so a second run on the same machine reuses it
# (seconds instead of minutes); a change to pyproject.toml or the constraints builds a fresh one.
# Set MAMBAVL_VENV to choose the location yourself.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
python="${PYTHON:-python3}"
key="$(cat "$repo/pyproject.toml" "$repo/scripts/constraints-dev.txt" | sha256sum | cut -c1-16)"
venv="${MAMBAVL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mambavl/venv-$key}"
stamp="$venv/.mambavl-installed${extras:+-$extras}"
if [ ! -f "$stamp" ]; then
    echo "[mambavl] installing into $venv (first run: a few minutes)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    # torch first, pinned for this build path, so nothing below pulls another build
    "$venv/bin/python" -m pip install -q -c "$repo/scripts/constraints-dev.txt" torch torchvision >&2
    "$venv/bin/python" -m pip install -q -c "$repo/scripts/constraints-dev.txt" -e "$repo${extras:+[$extras]}" >&2
    touch "$stamp"
else
    # the venv is shared between clones: point the editable install at this checkout (no dependency changes)
    "$venv/bin/python" -m pip install -q --no-deps -e "$repo" >&2
fi
export PATH="$venv/bin:$PATH"
export MAMBAVL_VENV="$venv"
