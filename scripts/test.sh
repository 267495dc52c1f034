#!/usr/bin/env bash
# Install (scripts/setup.sh), lint, and run the whole test suite; then the vLLM tests in their
# own environment (scripts/setup_vllm.sh; skip them with CRVLM_SKIP_VLLM=1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
lint-imports
python -m pytest -q "$@"
deactivate
if [ "${CRVLM_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/setup_vllm.sh
  . .venv-vllm/bin/activate
  VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m pytest -q tests/test_vllm.py -p no:cacheprovider
fi
