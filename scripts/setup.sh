#!/usr/bin/env bash
# Create or reuse .venv and install stepdpo with its test extra.
# torch is pinned to the CPU wheel first so that pip never pulls a multi-GB CUDA build on a CPU box:
# torch==2.13.0+cpu from pip's configured indexes / find-links, else from PyTorch's CPU index; only if
# neither has it, plain PyPI's torch==2.13.0 (on Linux x86_64 that one brings CUDA libraries).
# On a GPU machine, install the torch build you want before running this (an installed torch is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
  || python -m pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu" \
  || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
