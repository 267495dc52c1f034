#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the demo: assemble the demo VLM, build a no-stars bundle and
# show the same pictures and questions answered with and without it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
crvlm demo "$@"
