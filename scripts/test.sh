#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the whole suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One pytest worker per core (pytest-xdist), each test and the runs it starts at one torch/OpenMP thread: the tests'
# models are tiny, and two workers of two threads each on two cores wait on each other. A run with threads=N still
# gets N threads. STEPDPO_TEST_WORKERS=0 runs in one process; at most 4 workers.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q -p no:cacheprovider -n "${STEPDPO_TEST_WORKERS:-auto}" --maxprocesses 4 "$@"
