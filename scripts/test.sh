#!/usr/bin/env bash
# The README's second command: set everything up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/setup_comfyui.sh > /dev/null  # a real ComfyUI for the integration tests (cached outside the repo)
# One torch thread: on a 2-core machine any other busy process stalls multi-threaded steps 5-60x.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MMI_NUM_THREADS="${MMI_NUM_THREADS:-1}"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q -ra "$@"
