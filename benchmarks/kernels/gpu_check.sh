#!/usr/bin/env bash
# One device run: the CUDA test grids of talora.kernels, then the kernel benchmark.
# Usage (repository root, on a CUDA machine): OUT=/some/dir bash benchmarks/kernels/gpu_check.sh
# Works without installing the package: talora is a namespace package, so a folder holding
# talora/kernels -> ./kernels (and adapters, for gpu_serve_bench) on PYTHONPATH is enough; the
# benchmarks run as modules from the repository root. Logs and JSON land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/talora-gpu-check}
mkdir -p "$OUT"
shim=$(mktemp -d)
mkdir -p "$shim/talora"
ln -s "$PWD/kernels" "$shim/talora/kernels"
ln -s "$PWD/adapters" "$shim/talora/adapters"
export PYTHONPATH="$shim" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
tests_rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then  # SKIP_TESTS=1 runs the benchmark alone
    workers=""
    $PY -c "import xdist" 2>/dev/null && workers="-n 8 -p no:benchmark"
    timeout 270 $PY -m pytest tests/kernels/test_kernels.py --noconftest -p no:cacheprovider -q -m "gpu or not slow" \
        $workers --durations=5 2>&1 | tee "$OUT/pytest.log"
    tests_rc=${PIPESTATUS[0]}
fi
timeout 200 $PY -m benchmarks.kernels.kernel_bench --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "pytest rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
