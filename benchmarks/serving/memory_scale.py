"""Memory and scale of the talora engine: bytes per resident task, adapter load/replace time, many adapters.

On the embedded SmolLM2-135M (float32, CPU) with random adapters (m=64, n=16, r=8):

1. device bytes per resident task: the slot table's bytes divided by its slots (keys and values
   of n task-prompt rows in every layer, plus the gate), next to the host copy of the adapter;
2. time to replace one adapter with a new version: load (``AdapterRegistry.load_store``: read,
   validate, host copy, as ``PUT /v1/adapters/<task>`` does) and make it resident (``Engine.warm``:
   the worker computes its task KV, one forward of n rows through every layer), medians over
   ``--samples`` tasks; and ``TaloraModel.task_kv`` timed alone (one adapter, 8 stacked) next to
   the bare model's forward of n tokens, to show what the KV computation costs;
3. ``--store-tasks`` adapters in the store and ``--resident`` slots: engine start time and
   process RSS, then ``--requests`` score requests over Zipf(1.0) popularity across all stored
   tasks through the engine (slot hits, misses and evictions, throughput).

Writes one JSON summary (``benchmarks/results/serving/memory_scale.json``).

    python -m benchmarks.serving.memory_scale --store-tasks 10000 --resident 1000
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness.bundle import task_name, write_random_bundle
from benchmarks.harness.flags import add_flags, bench_parser
from benchmarks.harness.paths import SERVING_RESULTS
from benchmarks.harness.report import machine_info, write_json
from benchmarks.harness.request_set import assign_tasks, real_request_set
from benchmarks.harness.setups import make_talora_engine, start_engine


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--store-tasks", type=int, default=10000, help="adapters written to the store")
    p.add_argument("--resident", type=int, default=1000, help="task-KV slots of the engine")
    p.add_argument("--samples", type=int, default=20, help="adapters timed for load/replace")
    p.add_argument("--requests", type=int, default=256, help="score requests in the scale run")
    add_flags(p, threads=1, seed=0, out=SERVING_RESULTS / "memory_scale.json")
    return p.parse_args(argv)


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def load_and_replace_times(engine, tasks: list[str]) -> dict:
    """Median ms to load a new version (read, validate, host copy) and to make it resident.

    The load is ``AdapterRegistry.load_store`` (what ``PUT /v1/adapters/<task>`` runs); the task KV
    is computed by the engine's worker thread (``Engine.warm``, as after a PUT), timed until the
    worker publishes the new version as resident. Only the worker touches the slot table.
    """
    registry = engine.loaded.registry
    load_ms, kv_ms, replace_ms = [], [], []
    for task in tasks:
        t0 = time.perf_counter()
        adapter, _ = registry.load_store(task, f"alt/{task}")
        t1 = time.perf_counter()
        engine.warm(adapter)
        deadline = t1 + 60
        while adapter.key not in engine.resident and time.perf_counter() < deadline:
            time.sleep(0.0005)
        t2 = time.perf_counter()
        load_ms.append((t1 - t0) * 1e3)
        kv_ms.append((t2 - t1) * 1e3)
        replace_ms.append((t2 - t0) * 1e3)
    return {"load_host_ms": statistics.median(load_ms), "task_kv_via_worker_ms": statistics.median(kv_ms),
            "replace_total_ms": statistics.median(replace_ms), "replace_total_ms_min": min(replace_ms),
            "replace_total_ms_max": max(replace_ms), "samples": len(tasks)}


@torch.no_grad()
def task_kv_compute_times(engine, tasks: list[str], repeats: int = 5) -> dict:
    """``TaloraModel.task_kv`` alone (no slot write), one adapter and 8 stacked, ms per adapter.

    Runs on this thread while the engine is idle and only reads the model and the shared prefix;
    the bare model's forward of the same n tokens is timed next to it for comparison.
    """
    from talora.adapters.model.frozen_lm import dense_attention

    model, prefix = engine.loaded.runner.model, engine.loaded.runner.prefix
    adapters = [engine.adapter(t) for t in tasks[:8]]
    fast = torch.stack([a.fast for a in adapters])
    gate = torch.stack([a.gate for a in adapters])
    n = fast.shape[1]
    ids = torch.randint(0, model.lm.config.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    causal = torch.ones(1, n, n, dtype=torch.bool).tril()

    def bare():
        model.lm.run_layers(model.lm.embed(ids), torch.arange(n),
                            lambda _i, q, k, v: dense_attention(q[None], k[None], v[None], causal)[0])

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    one = timed(lambda: model.task_kv(prefix, fast[:1], gate[:1]))
    eight = timed(lambda: model.task_kv(prefix, fast, gate))
    return {"task_kv_one_ms": one, "task_kv_stacked8_ms_per_adapter": eight / len(adapters),
            "bare_forward_n_tokens_ms": timed(bare), "n_tokens": n, "repeats": repeats}


def scale_run(engine, tasks: list[str], args) -> dict:
    requests = real_request_set(engine.loaded.tokenizer, args.requests, 16, 128, args.seed)
    draws = assign_tasks(len(requests), len(tasks), "zipf", args.seed + 1)
    m = engine.metrics
    before = {k: getattr(m, k)._value.get() for k in ("slot_hits", "slot_misses", "slot_evictions")}
    run = make_talora_engine(engine, requests, [tasks[i] for i in draws])
    started = time.perf_counter()
    run()
    wall = time.perf_counter() - started
    after = {k: getattr(m, k)._value.get() - before[k] for k in before}
    tokens = sum(len(r.input_ids) for r in requests)
    return {"requests": len(requests), "distinct_tasks": len(set(draws)), "input_tokens": tokens,
            "wall_s": wall, "input_tokens_per_s": tokens / wall, **{k: int(v) for k, v in after.items()}}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from talora.adapters.model.config import TaloraConfig
    from talora.adapters.model.loading import load_model

    loaded = load_model()
    cfg = TaloraConfig(shared_prompt_len=64, task_prompt_len=16, rank=8)
    with tempfile.TemporaryDirectory(prefix="memory_scale_") as tmp:
        bundle = Path(tmp) / "bundle"
        t0 = time.perf_counter()
        write_random_bundle(loaded.model, loaded.fingerprint, bundle, args.store_tasks, cfg, args.seed,
                            alternates=args.samples)
        write_s = time.perf_counter() - t0
        rss_before = current_rss_mib()
        t0 = time.perf_counter()
        engine = start_engine(loaded, bundle, args.resident, 32, 128, args.threads)
        registry_s = time.perf_counter() - t0  # start() returns once every stored adapter is loaded
        target = min(args.resident, args.store_tasks)
        deadline = time.perf_counter() + 3600
        while len(engine.resident) < target and time.perf_counter() < deadline:  # the worker warms them
            time.sleep(0.2)
        start_s = time.perf_counter() - t0
        try:
            kv = engine.loaded.runner.slots.kv
            slot_bytes = kv.keys.nbytes + kv.values.nbytes + kv.gates.nbytes
            first = engine.adapter(task_name(0))
            host_bytes = first.fast.nbytes + first.gate.nbytes
            cache = engine.loaded.runner.pool.cache
            memory = {"device_bytes_per_resident_task": slot_bytes / engine.loaded.runner.slots.num_slots,
                      "slot_table_bytes": slot_bytes, "host_bytes_per_adapter_tensors": host_bytes,
                      "adapter_file_bytes": sum(f.stat().st_size for f in bundle.glob(f"{task_name(0)}.*")),
                      "kv_pool_bytes": cache.keys.nbytes + cache.values.nbytes,
                      "rss_mib_before_engine": rss_before, "rss_mib_after_start": current_rss_mib()}
            load_before = os.getloadavg()
            timing = load_and_replace_times(engine, [task_name(i) for i in range(args.samples)])
            timing.update(task_kv_compute_times(engine, [task_name(i) for i in range(args.samples)]))
            timing["loadavg_1_5_15_before"] = load_before
            scale = scale_run(engine, [task_name(i) for i in range(args.store_tasks)], args)
            resident = len(engine.loaded.runner.slots.resident())
        finally:
            engine.stop(timeout=10)
    summary = {"setup": {"model": "SmolLM2-135M-Instruct (embedded, float32)", "m": 64, "n": 16, "r": 8,
                         "store_tasks": args.store_tasks, "resident_slots": args.resident, "threads": args.threads},
               "machine": machine_info(args.threads), "memory": memory, "adapter_times": timing,
               "scale": {"write_store_s": write_s, "engine_start_registry_loaded_s": registry_s,
                         "engine_start_and_warm_s": start_s, "loadavg_1_5_15_end": os.getloadavg(),
                         "resident_after": resident,
                         "peak_rss_mib": rss_mib(), **scale}}
    write_json(args.out, summary)
    print(summary)


if __name__ == "__main__":
    main()
