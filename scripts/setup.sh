#!/usr/bin/env bash
# Create .venv and install qtune with its test extras. torch and torchvision come from PyPI as a matching pair
# (a CPU-only torch build cannot import the registry's torchvision, which timm needs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.*" "torchvision==0.29.*"
.venv/bin/python -m pip install --quiet -e ".[test,ray]"  # ray: the sweep's Ray executor is tested too
