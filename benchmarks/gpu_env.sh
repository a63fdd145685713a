# Sourced by the device scripts (gpu_engine_check.sh, gpu_decode_sweep.sh) from the repository root:
# PY (python3 or $PYTHON), the checkout importable as `talora` through a shim folder, unbuffered
# output, compiled Triton, and `workers` ("-n 8" where pytest-xdist is installed, else empty).
PY=${PYTHON:-python3}
shim=$(mktemp -d)
mkdir -p "$shim/talora"
for pkg in kernels adapters server; do ln -s "$PWD/$pkg" "$shim/talora/$pkg"; done
export PYTHONPATH="$shim:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
workers=""
$PY -c "import xdist" 2>/dev/null && workers="-n 8"
