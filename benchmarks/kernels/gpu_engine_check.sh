#!/usr/bin/env bash
# Issue 11's device run, under 10 minutes on an H200: the split-K decode kernel's CUDA tests, its
# HBM fraction at 1,024-token caches (torch + triton only), then engine_overhead --decode (predict
# engine vs forward, generation vs a bare decode loop, the kernel again) on the random Qwen2.5-0.5B
# and SmolLM2 shapes in bf16. Usage (repository root, CUDA machine): OUT=/some/dir bash benchmarks/kernels/gpu_engine_check.sh
# STAGES picks the parts (default "splitk decode engine"; "overlap" and "graphs" are extra: the engines
# with --overlap-steps, and the CUDA-graph tests with generation eager and from CUDA graphs at the same size;
# "http": talora-serve end to end over HTTP on a random Qwen2.5-0.5B-shape checkpoint, eager then
# --cuda-graphs, under the same open-loop completions load, and their goodput and p99 per rate).
# HTTP_RATES / HTTP_SECONDS / HTTP_TOKENS size that stage (default 4,16,64 requests/s, 20 s, 64 tokens).
# The engine needs pydantic, pydantic-settings, fastapi and their dependencies; a bare device image
# lacks them, so carry their wheels in .whl/ (docs/benchmarks.md lists them); they are installed first.
set -uo pipefail
OUT=${OUT:-/tmp/talora-engine-check}
mkdir -p "$OUT"
source benchmarks/kernels/gpu_env.sh
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv  # stdout only: $OUT returns 8 files at most
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-|-$//g')
STAGES=${STAGES:-splitk decode engine}  # any of: splitk decode engine overlap graphs http
[ "${OVERLAP:-0}" = 1 ] && STAGES="$STAGES overlap"
[ "${GRAPHS:-0}" = 1 ] && STAGES="$STAGES graphs"
has() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }
tests_rc=0 kernel_rc=0 engine_rc=0 graphs_rc=0 http_rc=0
DEVICE=${DEVICE:-cuda}  # cpu: the http stage's dry run on a machine without a GPU (tests/benchmarks)
if has splitk; then  # the split-K decode kernel's CUDA tests
    timeout 150 $PY -m pytest tests/kernels/test_decode_splitk.py --noconftest -p no:cacheprovider -q \
        -m "gpu or not slow" $workers 2>&1 | tee "$OUT/pytest.log"
    tests_rc=${PIPESTATUS[0]}
fi
if has decode; then  # the decode kernel's HBM fraction at 1,024-token caches
    timeout 90 $PY -m benchmarks.kernels.decode_bench --device cuda --dtype bfloat16 --out "$OUT/decode_kernel.json" 2>&1 \
        | tee "$OUT/decode_kernel.log"
    kernel_rc=${PIPESTATUS[0]}
fi
if has engine; then
    timeout 300 $PY -m benchmarks.serving.engine_overhead --device cuda --dtype bfloat16 --models qwen05b-random,smollm2-random \
        --requests qwen05b-random=1024,smollm2-random=1024 --max-tokens 128 --threads 4 --repeats 3 --tokenizer bytes \
        --decode --out "$OUT/engine_overhead-$card.json" 2>&1 | tee "$OUT/engine_overhead.log"
    engine_rc=${PIPESTATUS[0]}
fi
if has overlap; then  # the engines again with --overlap-steps (a smaller run)
    timeout 200 $PY -m benchmarks.serving.engine_overhead --device cuda --dtype bfloat16 --models qwen05b-random,smollm2-random \
        --requests qwen05b-random=512,smollm2-random=512 --max-tokens 128 --threads 4 --repeats 1 --tokenizer bytes \
        --decode --overlap-steps --out "$OUT/engine_overhead_overlap-$card.json" 2>&1 | tee "$OUT/engine_overhead_overlap.log"
fi
if has graphs; then  # the CUDA-graph tests, then generation with and without --cuda-graphs at the same size
    timeout 120 $PY -m pytest tests/adapters/runtime/test_decode_graphs.py -p no:cacheprovider -q -m gpu 2>&1 \
        | tee "$OUT/pytest_graphs.log"
    graphs_rc=${PIPESTATUS[0]}
    for mode in eager graphs; do
        flag=""; [ "$mode" = graphs ] && flag="--cuda-graphs"
        timeout 200 $PY -m benchmarks.serving.engine_overhead --device cuda --dtype bfloat16 --models qwen05b-random,smollm2-random \
            --requests qwen05b-random=64,smollm2-random=64 --repeats 1 --threads 4 --tokenizer bytes --decode \
            $flag --out "$OUT/engine_overhead_$mode-$card.json" 2>&1 | tee "$OUT/engine_overhead_$mode.log" | tail -n 25
        [ "${PIPESTATUS[0]}" = 0 ] || graphs_rc=1
    done
fi
if has http; then  # the server over HTTP, eager then with --cuda-graphs, same load, same checkpoint
    ckpt=${HTTP_CHECKPOINT:-/tmp/talora-qwen05b-random}
    [ -f "$ckpt/config.json" ] || timeout 300 $PY -m benchmarks.harness.random_checkpoint qwen05b-random "$ckpt" \
        --dtype bfloat16 || http_rc=1
    for mode in eager graphs; do
        flags="--device $DEVICE --dtype ${HTTP_DTYPE:-bfloat16}"
        [ "$mode" = graphs ] && flags="$flags --cuda-graphs"
        timeout ${HTTP_TIMEOUT:-240} $PY -m benchmarks.serving.load_test --start-server --model "$ckpt" \
            --server-args "$flags" --generate "${HTTP_TOKENS:-64}" --threads 4 --num-tasks ${HTTP_TASKS:-64} \
            --rates "${HTTP_RATES:-4,16,64}" --duration-s "${HTTP_SECONDS:-20}" --slo-ms ${HTTP_SLO_MS:-5000} \
            --jsonl "$OUT/http_$mode.jsonl" --summary "$OUT/http_$mode.json" --plot "$OUT/http_$mode.png" \
            2>&1 | tail -n 8
        [ "${PIPESTATUS[0]}" = 0 ] || http_rc=1
    done
    $PY -m benchmarks.serving.load_test --compare "$OUT/http_eager.json" "$OUT/http_graphs.json" \
        --summary "$OUT/http_graphs_vs_eager-$card.json" || http_rc=1
fi
echo "stages: $STAGES; pytest rc=$tests_rc decode_kernel rc=$kernel_rc engine_overhead rc=$engine_rc graphs rc=$graphs_rc http rc=$http_rc"
exit $(( tests_rc != 0 || kernel_rc != 0 || engine_rc != 0 || graphs_rc != 0 || http_rc != 0 ))
