#!/usr/bin/env bash
# Create or reuse .venv and install stepdpo with its test extra.
# torch is pinned to the CPU wheel first so that pip never pulls a multi-GB CUDA build on a CPU box;
# on a GPU machine, install the torch build you want before running this (an installed torch that
# satisfies the range is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
