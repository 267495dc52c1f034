#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the demo: build a cooking-only bundle for SmolLM2 and
# show the same questions answered with and without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
crvlm demo "$@"
