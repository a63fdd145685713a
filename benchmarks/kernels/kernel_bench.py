"""Benchmark of talora's gated prefix attention on one CUDA card, end to end in one run.

Checks the Triton kernel against the float64 reference first, then times prefill and decode at
the Qwen2.5-0.5B and -7B attention shapes (64 rows x 48 tokens, shared prompt m=64, task prompt
n=16; 1, 8 and 64 distinct tasks) against (a) torch SDPA's flash kernel on the same query and key
counts, the prompt re-encoded as 80 ordinary tokens in front of each row, and (b) the reference.
Writes one JSON summary (``benchmarks/results/kernels/kernels-<card>.json`` by default).

    python -m benchmarks.kernels.kernel_bench [--out PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from benchmarks.harness.paths import KERNELS_RESULTS
from talora.kernels.gated_attention import gated_prefix_attention
from talora.kernels.reference import gated_prefix_attention_ref

MODELS = {  # attention shapes of the Qwen2.5 configs
    "qwen2.5-0.5b": {"n_heads": 14, "n_kv_heads": 2, "head_dim": 64, "layers": 24},
    "qwen2.5-7b": {"n_heads": 28, "n_kv_heads": 4, "head_dim": 128, "layers": 28},
}
ROWS, TOKENS, SHARED_PROMPT, TASK_PROMPT = 64, 48, 64, 16
TASK_COUNTS = (1, 8, 64)
LONG_CACHE = 4096  # decode at a cache length where the KV stream, not launch latency, dominates
PEAKS = {  # datasheet dense bf16 FLOP/s and HBM bytes/s (SXM parts)
    "H100": {"bf16_flops": 989e12, "hbm_bytes_per_s": 3.35e12},
    "H200": {"bf16_flops": 989e12, "hbm_bytes_per_s": 4.8e12},
}
DTYPE = torch.bfloat16


def card_peaks(name: str) -> dict:
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    return {"bf16_flops": float("nan"), "hbm_bytes_per_s": float("nan")}


def make_inputs(cfg: dict, n_tasks: int, q_len: int, kv_len: int, seed: int = 0) -> tuple:
    """Kernel arguments for ROWS rows of q_len queries over kv_len own keys in a padded cache."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h, n_heads, n_kv = cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=DTYPE)

    cu_seqlens = torch.arange(ROWS + 1, device="cuda", dtype=torch.int32) * q_len
    if q_len == kv_len:  # packed prefill
        k_starts = cu_seqlens[:-1].clone()
    else:  # padded cache (ROWS, kv_len, H_kv, h) as (ROWS * kv_len, H_kv, h)
        k_starts = torch.arange(ROWS, device="cuda", dtype=torch.int32) * kv_len
    slot_ids = (torch.arange(ROWS, device="cuda") % n_tasks).to(torch.int32)
    return (
        randn(ROWS * q_len, n_heads, h), randn(ROWS * kv_len, n_kv, h), randn(ROWS * kv_len, n_kv, h),
        cu_seqlens, k_starts, torch.full((ROWS,), kv_len, device="cuda", dtype=torch.int32),
        randn(SHARED_PROMPT, n_kv, h), randn(SHARED_PROMPT, n_kv, h),
        randn(64, TASK_PROMPT, n_kv, h), randn(64, TASK_PROMPT, n_kv, h),
        slot_ids, torch.randn(64, n_heads, generator=gen, device="cuda").to(DTYPE), h ** -0.5,
    )


def attention_work(cfg: dict, n_tasks: int, q_len: int, kv_len: int) -> tuple[float, float]:
    """(FLOPs, fewest bytes) of one call: QK^T and PV over visible pairs; each input read once."""
    h, n_heads, n_kv = cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"]
    pairs_per_row = sum(SHARED_PROMPT + TASK_PROMPT + kv_len - q_len + i + 1 for i in range(q_len))
    flops = 4.0 * h * n_heads * ROWS * pairs_per_row
    elem = torch.finfo(DTYPE).bits // 8
    kv_rows = ROWS * kv_len + SHARED_PROMPT + n_tasks * TASK_PROMPT
    bytes_moved = elem * (2 * ROWS * q_len * n_heads * h + 2 * kv_rows * n_kv * h)
    return flops, bytes_moved


def sdpa_flash_call(cfg: dict, q_len: int, kv_len: int):
    """torch's flash kernel on [P; dP; X]: same query count, keys = m + n + own, bottom-right causal."""
    h, n_heads, n_kv = cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"]
    n_keys = SHARED_PROMPT + TASK_PROMPT + kv_len
    q = torch.randn(ROWS, q_len, n_heads, h, device="cuda", dtype=DTYPE).transpose(1, 2)
    k = torch.randn(ROWS, n_keys, n_kv, h, device="cuda", dtype=DTYPE).transpose(1, 2)
    v = torch.randn_like(k)
    # The raw flash op does not check GQA head counts (it would read past k), so it gets the
    # KV heads expanded to the query heads, as a model without GQA support in SDPA would.
    group = n_heads // n_kv
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    flash = torch.ops.aten._scaled_dot_product_flash_attention  # what SDPA's flash backend runs
    torch.cuda.synchronize()  # do_bench_cudagraph runs on a side stream: inputs must be ready
    return lambda: flash(q, k, v, 0.0, is_causal=True, scale=h ** -0.5), "expanded"


def check_correctness(cfg: dict, q_len: int, kv_len: int) -> float:
    """Relative L2 error of the kernel against the float64 reference on a bench shape."""
    args = make_inputs(cfg, 8, q_len, kv_len, seed=1)
    args64 = [a.double() if a.is_floating_point() else a for a in args[:12]] + [args[12]]
    out = torch.full_like(args[0], float("nan"))
    gated_prefix_attention(*args, out=out)  # type: ignore[misc]  # args: exactly the positional inputs
    ref = gated_prefix_attention_ref(*args64)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm()).item()


def time_kernel(args: tuple, q_len: int) -> float:
    out = torch.empty_like(args[0])
    torch.cuda.synchronize()  # do_bench_cudagraph runs on a side stream: inputs must be ready
    return do_bench_cudagraph(lambda: gated_prefix_attention(*args, out=out, max_q_len=q_len),  # type: ignore[misc]
                              rep=100, return_mode="median")


def bench_phase(model: str, cfg: dict, phase: str, q_len: int, kv_len: int, peaks: dict) -> list[dict]:
    rows = []
    sdpa, sdpa_heads = sdpa_flash_call(cfg, q_len, kv_len)
    sdpa_ms = do_bench_cudagraph(sdpa, rep=100, return_mode="median")
    for n_tasks in TASK_COUNTS:
        args = make_inputs(cfg, n_tasks, q_len, kv_len)
        ms = time_kernel(args, q_len)
        flops, bytes_moved = attention_work(cfg, n_tasks, q_len, kv_len)
        row = {"model": model, "phase": phase, "q_len": q_len, "kv_len": kv_len, "tasks": n_tasks,
               "triton_ms": ms, "sdpa_flash_ms": sdpa_ms, "sdpa_kv_heads": sdpa_heads,
               "tflops": flops / ms / 1e9, "gb_per_s": bytes_moved / ms / 1e6,
               "flop_fraction": flops / ms * 1e3 / peaks["bf16_flops"],
               "hbm_fraction": bytes_moved / ms * 1e3 / peaks["hbm_bytes_per_s"],
               "vs_sdpa_flash": sdpa_ms / ms}
        if n_tasks == 8 and kv_len == TOKENS:
            ref = functools.partial(gated_prefix_attention_ref, *args)
            row["reference_ms"] = do_bench(ref, warmup=5, rep=50, return_mode="median")
        print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in row.items()}, flush=True)
        rows.append(row)
    return rows


def measured_copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read plus written per second."""
    src = torch.empty(2**30, dtype=torch.int16, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return 2 * src.numel() * 2 / ms * 1e3


def summarise(rows: list[dict]) -> dict:
    def pick(model, phase, tasks, kv_len=None):
        return next(r for r in rows if r["model"] == model and r["phase"] == phase and r["tasks"] == tasks
                    and (kv_len is None or r["kv_len"] == kv_len))

    ratios: dict[str, dict] = {"prefill_vs_sdpa_flash": {}, "decode_hbm_fraction": {}, "mixed64_vs_single": {}}
    for model in MODELS:
        ratios["prefill_vs_sdpa_flash"][model] = {
            str(t): round(pick(model, "prefill", t)["vs_sdpa_flash"], 3) for t in TASK_COUNTS}
        ratios["decode_hbm_fraction"][model] = {
            f"cache{kv}": round(pick(model, "decode", 64, kv)["hbm_fraction"], 3) for kv in (TOKENS, LONG_CACHE)}
        ratios["mixed64_vs_single"][model] = {
            phase: round(pick(model, phase, 64)["triton_ms"] / pick(model, phase, 1)["triton_ms"], 3)
            for phase in ("prefill", "decode")}
    return ratios


def run(out_path: Path | None) -> int:
    name = torch.cuda.get_device_name()
    peaks = card_peaks(name)
    card = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    errors = {f"{model}/{phase}": check_correctness(cfg, q_len, kv_len) for model, cfg in MODELS.items()
              for phase, q_len, kv_len in (("prefill", TOKENS, TOKENS), ("decode", 1, TOKENS),
                                           ("decode-long", 1, LONG_CACHE))}
    correct = all(e < 2e-2 for e in errors.values())
    print("correctness (rel L2 vs float64 reference, bf16):", errors, flush=True)
    rows = []
    for model, cfg in MODELS.items():
        rows += bench_phase(model, cfg, "prefill", TOKENS, TOKENS, peaks)
        rows += bench_phase(model, cfg, "decode", 1, TOKENS, peaks)
        rows += [r for r in bench_phase(model, cfg, "decode", 1, LONG_CACHE, peaks) if r["tasks"] == 64]
    summary = {
        "device": name,
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version()},
        "shapes": {"rows": ROWS, "tokens": TOKENS, "shared_prompt": SHARED_PROMPT, "task_prompt": TASK_PROMPT,
                   "task_counts": list(TASK_COUNTS), "long_cache": LONG_CACHE, "dtype": str(DTYPE),
                   "models": MODELS},
        "peaks_datasheet": peaks,
        "measured_copy_bytes_per_s": measured_copy_bandwidth(),
        "timer": "triton.testing.do_bench_cudagraph median (reference: do_bench median)",
        "correctness_rel_l2": errors,
        "correct": correct,
        "ratios": summarise(rows),
        "results": rows,
    }
    out_path = out_path or KERNELS_RESULTS / f"kernels-{card}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(summary, indent=2) + "\n")
    print_table(rows)
    print(json.dumps(summary["ratios"], indent=1))
    print("wrote", out_path)
    return 0 if correct else 1


def print_table(rows: list[dict]) -> None:
    print(f"{'model':14} {'phase':8} {'kv':>5} {'tasks':>5} {'triton ms':>10} {'sdpa ms':>9} "
          f"{'x sdpa':>7} {'TFLOP/s':>8} {'GB/s':>7} {'HBM%':>5} {'ref ms':>8}")
    for r in rows:
        print(f"{r['model']:14} {r['phase']:8} {r['kv_len']:5d} {r['tasks']:5d} {r['triton_ms']:10.4f} "
              f"{r['sdpa_flash_ms']:9.4f} {r['vs_sdpa_flash']:7.2f} {r['tflops']:8.1f} {r['gb_per_s']:7.0f} "
              f"{100 * r['hbm_fraction']:5.1f} {r.get('reference_ms', float('nan')):8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON summary path")
    sys.exit(run(parser.parse_args().out))


if __name__ == "__main__":
    main()
