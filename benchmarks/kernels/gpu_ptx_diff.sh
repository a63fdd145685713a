#!/usr/bin/env bash
# Did a change to kernels/ change the code Triton compiles? The kernels' CUDA tests run twice, once
# importing talora.kernels from $OLD (a copy of kernels/ from before the change) and once from
# kernels/, each compiling into its own Triton cache; then the PTX of every compiled kernel is
# compared with its debug lines (.loc, .file, the .debug sections) removed, as multisets per
# kernel name. A refactor that leaves the PTX identical leaves speed and results as they were.
# Usage (repository root, CUDA machine):
#   cp -r kernels /somewhere/old   # before the change
#   OLD=/somewhere/old OUT=/some/dir bash benchmarks/kernels/gpu_ptx_diff.sh   # writes $OUT/ptx_diff.json
set -uo pipefail
OUT=${OUT:-/tmp/talora-ptx-diff}
OLD=${OLD:?OLD must name a copy of kernels/ from before the change}
TESTS=${TESTS:-tests/kernels}
mkdir -p "$OUT"
base_path=${PYTHONPATH:-}
source benchmarks/kernels/gpu_env.sh
old_shim=$(talora_shim "$OLD")
caches=$(mktemp -d)
rcs=""
for side in old new; do
    path="$PYTHONPATH"
    [ "$side" = old ] && path="$old_shim:$PWD${base_path:+:$base_path}"
    PYTHONPATH="$path" TRITON_CACHE_DIR="$caches/$side" timeout 240 $PY -m pytest $TESTS --noconftest \
        -p no:cacheprovider -q -m gpu $workers 2>&1 | grep -v PytestBenchmarkWarning | tee "$OUT/pytest-$side.log" \
        | tail -n 3
    rcs="$rcs ${PIPESTATUS[0]}"
done
$PY - "$caches" "$OUT/ptx_diff.json" "$rcs" <<'PY'
import collections, json, re, sys
from pathlib import Path

caches, out, rcs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split()

def normalised(text: str) -> str:
    text = text.split(".section\t.debug", 1)[0].split(".section .debug", 1)[0]
    return "\n".join(line for line in text.splitlines()
                     if not re.match(r"\s*(\.loc|\.file|//)", line) and line.strip())

sides = {}
for side in ("old", "new"):
    kernels = collections.defaultdict(collections.Counter)
    for ptx in (caches / side).rglob("*.ptx"):
        kernels[ptx.stem][normalised(ptx.read_text())] += 1
    sides[side] = kernels
names = sorted(set(sides["old"]) | set(sides["new"]))
report = {"pytest_rc": {"old": int(rcs[0]), "new": int(rcs[1])}, "kernels": {}}
for name in names:
    old, new = sides["old"].get(name, collections.Counter()), sides["new"].get(name, collections.Counter())
    report["kernels"][name] = {"old_variants": sum(old.values()), "new_variants": sum(new.values()),
                               "identical": old == new,
                               "only_old": sum((old - new).values()), "only_new": sum((new - old).values())}
report["identical"] = all(k["identical"] for k in report["kernels"].values()) and bool(names)
out.write_text(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
PY
