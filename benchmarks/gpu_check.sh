#!/usr/bin/env bash
# One device run: the CUDA test grids of talora.kernels, then the kernel benchmark.
# Usage (repository root, on a CUDA machine): OUT=/some/dir bash benchmarks/gpu_check.sh
# Works without installing the package: talora is a namespace package, so a folder holding
# talora/kernels -> ./kernels on PYTHONPATH is enough. Logs and JSON land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/talora-gpu-check}
mkdir -p "$OUT"
shim=$(mktemp -d)
mkdir -p "$shim/talora"
ln -s "$PWD/kernels" "$shim/talora/kernels"
export PYTHONPATH="$shim:$PWD/benchmarks" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
tests_rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then  # SKIP_TESTS=1 runs the benchmark alone
    workers=""
    $PY -c "import xdist" 2>/dev/null && workers="-n 8 -p no:benchmark"
    timeout 270 $PY -m pytest tests/test_kernels.py --noconftest -p no:cacheprovider -q -m "gpu or not slow" \
        $workers --durations=5 2>&1 | tee "$OUT/pytest.log"
    tests_rc=${PIPESTATUS[0]}
fi
timeout 200 $PY benchmarks/kernel_bench.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
echo "pytest rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
