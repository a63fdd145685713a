"""serve_bench on one CUDA card with a random-weight model of the Qwen2.5-0.5B shape in bf16.

Nothing is downloaded: the model is built from its config with random weights (speed does not
depend on the values), the 64 task adapters are random, and the inputs are random token ids with
the CPU bench's length law (uniform 16..128 tokens). Prefill-only: every request's input goes
through the model once and its last-token logits are computed. Setups, timed interleaved in one
run (warm-up pass each, then ``--repeats`` rounds, medians, CUDA-synchronised ``perf_counter``):

  bare_hf              HF transformers, bare model on the bare inputs (left-padded batches)
  reencode_mixed64     HF with each row's [P; ΔP_t] (m+n rows) re-encoded in front of its input
  talora_mixed64       TaloraModel.forward_cached (Triton kernels), 64 tasks with Zipf(1.0)
                       popularity mixed in every packed batch, task KV from a slot table
  talora_single        the same with one task
  peft_grouped_mixed64 PEFT prompt tuning, one adapter at a time, batches of one task (if peft imports)

Needs ``talora`` importable: installed, or (no install on a bare GPU machine) a folder holding
``talora/kernels`` and ``talora/adapters`` links on ``PYTHONPATH``, as ``benchmarks/kernels/gpu_check.sh``
makes. Writes ``<out-dir>/gpu_serve_bench-<card>.json``.

    python -m benchmarks.serving.gpu_serve_bench --out-dir "$OUT"
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.bundle import random_talora_model, task_name
from benchmarks.harness.flags import add_flags, bench_parser
from benchmarks.harness.paths import SERVING_RESULTS
from benchmarks.harness.report import machine_info, ratio, write_json
from benchmarks.harness.request_set import assign_tasks, build_request_set
from benchmarks.harness.setups import (
    build_peft_model,
    make_bare_hf,
    make_peft_grouped,
    make_reencode_hf,
    make_talora,
    talora_task_prompts,
)

QWEN25_05B: dict[str, Any] = dict(
    hidden_size=896, num_attention_heads=14, num_key_value_heads=2, head_dim=64, num_hidden_layers=24,
    intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6)


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_flags(p, num_requests=1024, min_tokens=16, max_tokens=128, shared_prompt_len=64, task_prompt_len=16, rank=8,
              batch_size=64, repeats=5)
    p.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"], help="decoder layers (smoke tests)")
    p.add_argument("--device", default="cuda", help="torch device")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="weights and KV")
    add_flags(p, seed=0, helps={"seed": "seed of weights, adapters and requests"})
    p.add_argument("--out-dir", type=Path, default=SERVING_RESULTS, help="where the JSON goes")
    return p.parse_args(argv)


def build_models(args):
    """HF Qwen2 with random weights, and talora's CausalLM holding the same tensors."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from talora.adapters.model.config import ModelConfig
    from talora.adapters.model.frozen_lm import CausalLM, rope_inv_freq

    dtype = getattr(torch, args.dtype)
    config = Qwen2Config(**{**QWEN25_05B, "num_hidden_layers": args.layers})
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        hf_model = Qwen2ForCausalLM(config).to(dtype).eval()
    with torch.device("meta"):
        lm = CausalLM(ModelConfig.from_hf(config.to_dict()))
    missing, unexpected = lm.load_state_dict(hf_model.state_dict(), strict=False, assign=True)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"weights do not map: missing {missing[:3]}, unexpected {unexpected[:3]}")
    lm.lm_head.weight = lm.model.embed_tokens.weight
    lm.inv_freq = rope_inv_freq(lm.config)  # built on the meta device with the module
    lm = lm.to(device=args.device, dtype=dtype).eval().requires_grad_(False)
    return hf_model, lm


def random_requests(args, vocab_size: int):
    gen = torch.Generator().manual_seed(args.seed)
    texts = {"random": [" ".join(map(str, torch.randint(0, vocab_size, (64,), generator=gen).tolist()))
                        for _ in range(256)]}
    return build_request_set(texts, lambda s: [int(t) for t in s.split()], args.num_requests,
                             args.min_tokens, args.max_tokens, args.seed)


def build_setups(args, hf_model, lm, requests) -> tuple[dict, dict]:
    from talora.adapters.model.config import TaloraConfig

    cfg = TaloraConfig(shared_prompt_len=args.shared_prompt_len, task_prompt_len=args.task_prompt_len, rank=args.rank)
    talora_model = random_talora_model(lm, cfg, 64, args.seed)
    names = [task_name(i) for i in range(64)]
    with torch.inference_mode():
        prefix = talora_model.shared_kv()
        fast, gates = talora_model.stacked(names)
        started = time.perf_counter()
        slots = talora_model.task_kv(prefix, fast, gates)
        torch.cuda.synchronize() if args.device.startswith("cuda") else None
        task_kv_s = time.perf_counter() - started
    prompts = talora_task_prompts(talora_model, names)
    mixed = assign_tasks(len(requests), 64, "zipf", args.seed + 1)
    bs = args.batch_size
    setups = {
        "bare_hf": make_bare_hf(hf_model, requests, bs),
        "reencode_mixed64": make_reencode_hf(hf_model, prompts, requests, mixed, bs),
        "talora_mixed64": make_talora(talora_model, prefix, slots, requests, mixed, bs),
        "talora_single": make_talora(talora_model, prefix, slots, requests, [0] * len(requests), bs),
    }
    notes: dict[str, Any] = {"task_kv_64_tasks_s": task_kv_s, "distinct_tasks_mixed64": len(set(mixed))}
    try:
        from copy import deepcopy

        peft_model = build_peft_model(deepcopy(hf_model), prompts)
        setups["peft_grouped_mixed64"] = make_peft_grouped(peft_model, requests, mixed, bs)
    except Exception as exc:  # noqa: BLE001 - one GPU try: record why PEFT did not run, time the rest
        notes["peft"] = f"skipped: {type(exc).__name__}: {exc}"
    return setups, notes


def time_setups(setups: dict, repeats: int, sync) -> dict[str, list[float]]:
    for run in setups.values():
        run()
    sync()
    walls: dict[str, list[float]] = {name: [] for name in setups}
    for _ in range(repeats):
        for name, run in setups.items():
            sync()
            started = time.perf_counter()
            run()
            sync()
            walls[name].append(time.perf_counter() - started)
    return walls


def main(argv=None) -> None:
    args = parse_args(argv)

    hf_model, lm = build_models(args)
    requests = random_requests(args, QWEN25_05B["vocab_size"])
    input_tokens = sum(len(r.input_ids) for r in requests)
    setups, notes = build_setups(args, hf_model, lm, requests)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    walls = time_setups(setups, args.repeats, sync)
    rows = {name: {"input_tokens_per_s": input_tokens / statistics.median(w), "wall_s": w} for name, w in walls.items()}
    tps: dict[str, float] = {name: input_tokens / statistics.median(w) for name, w in walls.items()}
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    ratios = {
        "talora_mixed64_vs_bare": ratio(tps["talora_mixed64"], tps["bare_hf"]),
        "talora_mixed64_vs_reencode": ratio(tps["talora_mixed64"], tps["reencode_mixed64"]),
        "talora_mixed64_vs_peft": ratio(tps["talora_mixed64"], tps.get("peft_grouped_mixed64")),
        "talora_single_vs_bare": ratio(tps["talora_single"], tps["bare_hf"]),
    }
    summary = {
        "setup": {"model": "random-weight Qwen2.5-0.5B shape", "layers": args.layers, "dtype": args.dtype,
                  "num_requests": len(requests), "input_tokens": input_tokens, "batch_size": args.batch_size,
                  "shared_prompt_len": args.shared_prompt_len, "task_prompt_len": args.task_prompt_len,
                  "rank": args.rank, "repeats": args.repeats, "workload": "prefill-only, last-token logits"},
        "machine": machine_info(), "card": card, "throughputs": rows, "notes": notes,
        "ratios": ratios,
    }
    out = args.out_dir / f"gpu_serve_bench-{re.sub(r'[^A-Za-z0-9]+', '-', card).strip('-')}.json"
    write_json(out, summary)
    for name, value in tps.items():
        print(f"{name:24s} {value:12.0f} input tok/s")
    for name, ratio_value in ratios.items():
        print(f"{name:28s} {ratio_value:.3f}" if ratio_value else f"{name:28s} n/a")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
