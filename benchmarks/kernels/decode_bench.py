"""Decode measurements of ``engine_overhead.py --decode``: generation against a bare decode loop,
and the decode attention kernel's share of the card's HBM bandwidth at a 1,024-token cache.

``generation_vs_bare_loop``: ``rows`` generate jobs (greedy, ``new_tokens`` each, prompts of
``prompt_len`` random tokens, 64 tasks mixed) submitted at once to the engine (in-process, no
HTTP), against a plain decode loop of the bare model in the same process: one batched prefill,
then one token per row per step with a static KV cache, ``scaled_dot_product_attention`` and
the argmax on the device (the gpt-fast shape of a loop, no prompt, no adapters, no scheduler).
Both count generated tokens over wall time, prefill included; medians of ``repeats`` rounds.

``decode_kernel_hbm``: one decode call of ``gated_prefix_attention`` (64 rows, one query each,
shared prompt 64 + task prompt 16 keys, ``cache`` own keys, 64 tasks) at the model's attention
shape, as dispatched (split-K by ``talora.kernels.dispatch.decode_splits``), as the one-pass
kernel, and split-K at fixed split counts. Bytes moved are the fewest possible (q, every key and
value, the output, each once); time is ``triton.testing.do_bench``'s median, which flushes L2
between calls, so the cache is read from HBM. Fraction = bytes / time / the card's datasheet
peak (``HBM_PEAKS``). On a CPU only the reference runs, for a smoke test: no fraction.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

# Datasheet HBM bandwidth (bytes/s) by a fragment of the CUDA device name, most specific first.
HBM_PEAKS = (
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("GH200", 4.0e12), ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
    ("L40S", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12), ("RTX 4090", 1.008e12),
)
SHARED_PROMPT, TASK_PROMPT, TASKS = 64, 16, 64


def hbm_peak(card: str) -> float | None:
    """Datasheet HBM bytes/s of ``card`` (a ``torch.cuda.get_device_name``), None when unknown."""
    return next((peak for key, peak in HBM_PEAKS if key in card), None)


# ----- generation: engine vs bare loop -----------------------------------------------------------
def prompts_for(rows: int, prompt_len: int, vocab: int, seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 40000), (rows, prompt_len), generator=gen).tolist()


def engine_generation(engine, adapters: list, prompts: list[list[int]], new_tokens: int):
    """A runner: every prompt as a greedy generate job at once; returns the tokens generated."""
    from talora.server.jobs import Failed, Finished, GenerationParams, Job

    params = GenerationParams(max_new_tokens=new_tokens, temperature=0)

    def run() -> int:
        done, results = threading.Semaphore(0), []

        def emit(event) -> None:
            if isinstance(event, (Finished, Failed)):
                results.append(event)
                done.release()

        deadline = time.monotonic() + 3600
        engine.submit([Job("generate", a, list(p), emit, deadline, params) for a, p in zip(adapters, prompts)])
        for _ in prompts:
            done.acquire()
        failed = [e for e in results if not isinstance(e, Finished)]
        if failed:
            raise RuntimeError(f"generate jobs failed: {failed[:1]}")
        return sum(e.completion_tokens for e in results if isinstance(e, Finished))

    return run


@torch.inference_mode()
def bare_greedy(lm, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation ``(B, new_tokens)`` of equal-length prompts ``ids (B, P)`` by the bare model,
    with a static KV cache and ``scaled_dot_product_attention``; no host sync inside."""
    cfg, device = lm.config, lm.device
    rows, prompt_len = ids.shape
    shape = (cfg.num_layers, rows, cfg.num_kv_heads, prompt_len + new_tokens, cfg.head_dim)
    keys, values = torch.empty(shape, dtype=lm.dtype, device=device), torch.empty(shape, dtype=lm.dtype, device=device)

    def step(tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Feed ``tokens (B, S)`` at positions ``start..``; returns the next greedy tokens ``(B, 1)``."""
        width = tokens.shape[1]
        positions = torch.arange(start, start + width, device=device).expand(rows, width)

        def attend(layer: int, q, k, v):  # (B, S, H, h), (B, S, H_kv, h)
            keys[layer, :, :, start:start + width] = k.transpose(1, 2)
            values[layer, :, :, start:start + width] = v.transpose(1, 2)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys[layer, :, :, :start + width],
                                                 values[layer, :, :, :start + width], is_causal=width > 1,
                                                 enable_gqa=True)
            return out.transpose(1, 2)

        hidden = lm.run_layers(lm.embed(tokens), positions, attend)
        return lm.logits(hidden[:, -1]).argmax(-1, keepdim=True)

    generated = [step(ids, 0)]
    for t in range(new_tokens - 1):
        generated.append(step(generated[-1], prompt_len + t))
    return torch.cat(generated, dim=1)


def bare_decode_loop(lm, prompts: list[list[int]], new_tokens: int, sync):
    """A runner: the bare model decodes ``new_tokens`` greedy tokens for every prompt; returns the count."""
    ids = torch.tensor(prompts, device=lm.device)

    def run() -> int:
        bare_greedy(lm, ids, new_tokens)
        sync()
        return ids.shape[0] * new_tokens

    return run


def generation_vs_bare_loop(loaded, bundle, args, sync) -> dict:
    """Decode tokens/s of the engine and of the bare loop on the same prompts, interleaved rounds."""
    from benchmarks.harness.bundle import task_name
    from talora.server.engine import Engine
    from talora.server.settings import Settings

    rows, prompt_len, new_tokens = args.gen_rows, args.gen_prompt_tokens, args.gen_new_tokens
    prompts = prompts_for(rows, prompt_len, loaded.model.config.vocab_size)
    settings = Settings(bundle=bundle, num_slots=64, max_batch_size=rows, max_queue=100_000,
                        max_batch_tokens=max(rows * prompt_len, 16), torch_threads=args.threads,
                        kv_cache_tokens=rows * (prompt_len + new_tokens) + 64, request_timeout_s=3600,
                        max_new_tokens_limit=new_tokens, cuda_graphs=getattr(args, "cuda_graphs", False),
                        overlap_steps=getattr(args, "overlap_steps", False))
    memory: dict[str, Any] = {"before_engine": device_memory(loaded.model.device)}
    engine = Engine(settings.engine_config(), loaded=loaded)
    engine.start()
    try:
        registry = engine.loaded.registry
        adapters = [registry.get(task_name(i % TASKS)) for i in range(rows)]
        runs = {"engine": engine_generation(engine, adapters, prompts, new_tokens),
                "bare_loop": bare_decode_loop(loaded.model, prompts, new_tokens, sync)}
        rates: dict[str, list[float]] = {name: [] for name in runs}
        tokens: dict[str, int] = {}
        runs["engine"]()  # warm-up: captures the graphs the rounds replay
        memory["after_engine_warmup"] = device_memory(loaded.model.device)
        graphs = engine.loaded.runner.graphs
        memory["graph_buckets"] = [list(b) for b in graphs.buckets] if graphs is not None else []
        runs["bare_loop"]()  # warm-up
        for _ in range(args.gen_repeats):
            for name, run in runs.items():
                started = time.perf_counter()
                tokens[name] = run()
                rates[name].append(tokens[name] / (time.perf_counter() - started))
    finally:
        engine.stop(30)
    engine_rate, bare_rate = statistics.median(rates["engine"]), statistics.median(rates["bare_loop"])
    return {"rows": rows, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "generated": tokens,
            "cuda_graphs": settings.cuda_graphs, "overlap_steps": settings.overlap_steps,
            "tokens_per_s": rates, "engine_tokens_per_s": engine_rate, "bare_loop_tokens_per_s": bare_rate,
            "decode_vs_bare_loop": engine_rate / bare_rate, "device_memory": memory}


def device_memory(device: torch.device) -> dict | None:
    """MiB of CUDA memory torch holds on ``device`` (allocated, reserved, peak allocated); None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    mib = 2.0**20
    return {"allocated_mib": torch.cuda.memory_allocated(device) / mib,
            "reserved_mib": torch.cuda.memory_reserved(device) / mib,
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / mib}


# ----- the decode kernel's HBM fraction ----------------------------------------------------------
def decode_inputs(cfg, rows: int, cache: int, dtype: torch.dtype, device: str, seed: int = 0) -> tuple:
    """``gated_prefix_attention`` arguments of one decode step: ``rows`` rows of ``cache`` keys, padded cache."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n_heads, n_kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    def ints(values):
        return values.to(device=device, dtype=torch.int32)

    return (randn(rows, n_heads, h), randn(rows * cache, n_kv, h), randn(rows * cache, n_kv, h),
            ints(torch.arange(rows + 1)), ints(torch.arange(rows) * cache), ints(torch.full((rows,), cache)),
            randn(SHARED_PROMPT, n_kv, h), randn(SHARED_PROMPT, n_kv, h),
            randn(TASKS, TASK_PROMPT, n_kv, h), randn(TASKS, TASK_PROMPT, n_kv, h),
            ints(torch.arange(rows) % TASKS), randn(TASKS, n_heads), h ** -0.5)


def decode_bytes(cfg, rows: int, cache: int, dtype: torch.dtype) -> int:
    """Fewest bytes one decode call moves: q and out, every own/prefix/task key and value once."""
    elem = torch.finfo(dtype).bits // 8
    kv_rows = rows * cache + SHARED_PROMPT + min(rows, TASKS) * TASK_PROMPT
    return elem * (2 * rows * cfg.num_heads * cfg.head_dim + 2 * kv_rows * cfg.num_kv_heads * cfg.head_dim)


def decode_variants(args: Any, cache: int) -> dict:
    """Name -> zero-argument call of each decode implementation measured."""
    from talora.kernels.dispatch import gated_prefix_attention

    out = torch.empty_like(args[0])
    # ``args`` is exactly the kernels' positional inputs, so the keywords never collide (mypy cannot tell)
    variants = {"dispatched": lambda: gated_prefix_attention(*args, out=out, max_q_len=1,  # type: ignore[misc]
                                                             max_kv_len=cache)}
    if args[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1":  # interpreted: the CPU smoke test
        from talora.kernels.decode_attention import gated_decode_attention
        from talora.kernels.gated_attention import gated_prefix_attention as one_pass

        variants["one_pass"] = lambda: one_pass(*args, out=out, max_q_len=1)  # type: ignore[misc]
        for splits in (2, 4, 8):
            variants[f"split{splits}"] = partial(gated_decode_attention, *args, out=out, max_kv_len=cache,  # type: ignore[misc]
                                                 num_splits=splits)
    return variants


def time_call(fn, device: str) -> float:
    """Median seconds of ``fn``: ``triton.testing.do_bench`` on CUDA (L2 flushed), perf_counter on CPU."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def decode_kernel_hbm(cfg, args) -> dict:
    """Time each decode variant at ``args.kernel_cache`` keys; HBM fraction against the card's peak."""
    import talora.kernels.dispatch as dispatch
    from talora.kernels.reference import gated_prefix_attention_ref

    device, dtype = args.device, getattr(torch, args.dtype)
    rows, cache = args.kernel_rows, args.kernel_cache
    inputs = decode_inputs(cfg, rows, cache, dtype, device)
    card = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    peak = hbm_peak(card) if card != "cpu" else None
    moved = decode_bytes(cfg, rows, cache, dtype)
    variants = decode_variants(inputs, cache)
    wide: Any = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in inputs]
    ref = gated_prefix_attention_ref(*wide)
    result: dict = {"rows": rows, "cache": cache, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                    "head_dim": cfg.head_dim, "bytes": moved, "card": card, "hbm_peak_bytes_per_s": peak,
                    "dispatched_splits": dispatch.decode_splits(
                        rows, cfg.num_kv_heads, SHARED_PROMPT + cache,
                        dispatch._sm_count(torch.device(device).index if card != "cpu" else None)),
                    "variants": {}}
    for name, call in variants.items():
        out = call()
        rel = float((out.double() - ref).norm() / ref.norm())
        seconds = time_call(call, device)
        result["variants"][name] = {"us": seconds * 1e6, "bytes_per_s": moved / seconds, "rel_l2": rel,
                                    "hbm_fraction": moved / seconds / peak if peak else None}
    result["decode_hbm_fraction"] = result["variants"]["dispatched"]["hbm_fraction"]
    return result


# ----- standalone: the kernel alone (torch and triton only; engine_overhead --decode runs both) ---
def main(argv=None) -> None:
    """``python -m benchmarks.kernels.decode_bench --device cuda --dtype bfloat16 --out PATH``: the decode kernel
    at the Qwen2.5-0.5B and SmolLM2 attention shapes, as ``decode_hbm_fraction_1k`` by model."""
    import argparse
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from benchmarks.serving.engine_overhead import GPU_NAMES, SHAPES

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="q, KV and output")
    p.add_argument("--kernel-rows", type=int, default=64, help="rows (one query each)")
    p.add_argument("--kernel-cache", type=int, default=1024, help="cached keys per row")
    p.add_argument("--out", type=Path, default=None, help="JSON summary (default: print only)")
    args = p.parse_args(argv)
    results = {GPU_NAMES[name]: decode_kernel_hbm(SimpleNamespace(**SHAPES[name]), args) for name in GPU_NAMES}
    key = "decode_hbm_fraction_1k" if args.kernel_cache == 1024 else f"decode_hbm_fraction_cache{args.kernel_cache}"
    summary = {"setup": vars(args) | {"out": str(args.out)}, "results": results,
               "ratios": {key: {name: r["decode_hbm_fraction"] for name, r in results.items()}}}
    for name, r in results.items():
        print(name, {v: (round(x["us"], 1), x["hbm_fraction"] and round(x["hbm_fraction"], 3))
                     for v, x in r["variants"].items()}, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
