#!/usr/bin/env bash
# Install mambavl and run the embedded demo: synthetic kitchen clips -> extraction -> MambaVL training ->
# evaluation -> audit -> short ablation, on CPU, no downloads. Report in ./mambavl-demo (replaced on a re-run).
# Extra arguments go to `mambavl demo` (e.g. --quick, --out DIR). MAMBAVL_TORCH=cpu: PyTorch's CPU-only build (see
# scripts/venv.sh); MAMBAVL_DRY_RUN=1: print the commands instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh ""  # no extras (an explicit argument: a sourced file would see ours, e.g. --quick)
run exec mambavl demo --overwrite "$@"
