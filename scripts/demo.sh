#!/usr/bin/env bash
# Install mambavl and run the embedded demo: synthetic kitchen clips -> extraction -> MambaVL training ->
# evaluation -> short ablation, on CPU, no downloads. Extra arguments go to `mambavl demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec mambavl demo "$@"
