#!/usr/bin/env bash
# The decode kernel's variants (as dispatched, one pass, split-K at 2/4/8) over rows x cache length
# on a CUDA machine, in bf16, for the split-K dispatch rule (kernels/dispatch.py decode_splits);
# then the kernels' CUDA tests. torch + triton only. Usage (repository root):
#   OUT=/some/dir bash benchmarks/kernels/gpu_decode_sweep.sh    # writes $OUT/decode_sweep.json, $OUT/pytest.log
set -uo pipefail
OUT=${OUT:-/tmp/talora-decode-sweep}
mkdir -p "$OUT/sweep"
source benchmarks/kernels/gpu_env.sh
for rows in ${ROWS:-1 8 64}; do
    for cache in ${CACHES:-1024 8192}; do
        timeout 60 $PY -m benchmarks.kernels.decode_bench --device cuda --dtype bfloat16 --kernel-rows "$rows" \
            --kernel-cache "$cache" --out "$OUT/sweep/r${rows}_c${cache}.json" 2>&1 | tail -n 2
    done
done
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = [json.loads(p.read_text()) for p in sorted((out / "sweep").glob("*.json"))]
(out / "decode_sweep.json").write_text(json.dumps(runs, indent=1))
for run in runs:
    for model, r in run["results"].items():
        us = {k: round(v["us"], 1) for k, v in r["variants"].items()}
        print(f"{model:8s} rows {r['rows']:3d} cache {r['cache']:5d} dispatched splits {r['dispatched_splits']}: {us}")
PY
timeout 150 $PY -m pytest tests/kernels --noconftest -p no:cacheprovider -q -m gpu $workers 2>&1 \
    | grep -v PytestBenchmarkWarning | tee "$OUT/pytest.log" | tail -n 15
