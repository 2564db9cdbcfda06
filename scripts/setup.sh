#!/usr/bin/env bash
# Create ./.venv (if needed) and install vpmoe-compile with its test extra.
# torch is pinned to 2.13.0 first: on the project's CPU machines pip resolves that to the CPU
# build on local disk (no multi-GB CUDA download); elsewhere it is the normal PyPI wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
