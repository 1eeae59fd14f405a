#!/usr/bin/env bash
# Install mambavl and run the embedded demo: synthetic kitchen clips -> extraction -> MambaVL training ->
# evaluation -> audit -> short ablation, on CPU, no downloads. Report in ./mambavl-demo (replaced on a re-run).
# Extra arguments go to `mambavl demo` (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
exec mambavl demo --overwrite "$@"
