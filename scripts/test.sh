#!/usr/bin/env bash
# Install (scripts/setup.sh), lint, and run the whole test suite; then the vLLM tests, with the
# Steerer and serving-core tests again under vLLM's transformers pin, in their own environment
# (scripts/setup_vllm.sh; skip them with CRVLM_SKIP_VLLM=1).
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
  VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m pytest -q -p no:cacheprovider tests/test_vllm.py tests/test_serving_core.py tests/test_steerer.py
fi
