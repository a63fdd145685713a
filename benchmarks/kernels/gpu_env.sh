# Sourced by the device scripts (gpu_engine_check.sh, gpu_decode_sweep.sh, gpu_ptx_diff.sh) from the
# repository root: PY (python3 or $PYTHON), the checkout importable as `talora` through a shim folder
# (`talora_shim DIR` makes one whose talora.kernels is DIR), unbuffered output, compiled Triton, and
# `workers` ("-n 8" where pytest-xdist is installed, else empty).
PY=${PYTHON:-python3}
talora_shim() {  # prints a new folder holding talora/{kernels -> $1, adapters, server}
    local shim
    shim=$(mktemp -d)
    mkdir -p "$shim/talora"
    ln -s "$(cd "$1" && pwd)" "$shim/talora/kernels"
    for pkg in adapters server; do ln -s "$PWD/$pkg" "$shim/talora/$pkg"; done
    echo "$shim"
}
shim=$(talora_shim kernels)
export PYTHONPATH="$shim:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
workers=""
$PY -c "import xdist" 2>/dev/null && workers="-n 8"
