"""One generation, talora's engine against Hugging Face ``generate`` on the same model, side by side.

In one process, on the same frozen model (the embedded SmolLM2-135M-Instruct unless ``--model``
says otherwise), dtype and torch threads: a greedy generation of one prompt through the in-process
``Engine`` (a demo task's adapter: the shared and task prompts are computed once, as when serving)
against ``model.generate`` of transformers on the same prompt ids, forced to the same number of new
tokens. Per thread count, ``--repeats`` rounds alternate the two; reported are medians of wall and
CPU time (``time.process_time``) per generated token, the first token's latency (talora: the first
``Token`` event after submission; HF: ``generate`` of one token), and the ratios talora / HF (above
1: talora is faster in tokens/s; below 1 for the first token: talora answers sooner).

    python -m benchmarks.serving.decode_vs_hf --threads 1,2 --new-tokens 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.paths import SERVING_RESULTS
from benchmarks.harness.report import machine_info, write_json

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="frozen model: the embedded default or a folder")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and KV")
    p.add_argument("--task", default="squad_dev", help="the demo task whose adapter talora generates with")
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--repeats", type=int, default=5, help="rounds per setup (medians)")
    p.add_argument("--profile", action="store_true",
                   help="also profile both decode steps (torch.profiler, 1 thread): ops and self CPU per token")
    p.add_argument("--out", type=Path, default=SERVING_RESULTS / "decode_vs_hf.json", help="summary JSON")
    return p.parse_args(argv)


class Clock:
    """Wall and process CPU time of a block."""

    def __enter__(self) -> Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def talora_generate(engine: Any, adapter: Any, ids: list[int], new_tokens: int) -> dict[str, float]:
    """One greedy generation through the engine: wall, CPU, first-token seconds and tokens made."""
    from talora.server.jobs import Failed, Finished, GenerationParams, Job, Token

    done = threading.Event()
    first: list[float] = []
    result: list[Any] = []

    def emit(event: Any) -> None:
        if isinstance(event, Token) and not first:
            first.append(time.perf_counter())
        if isinstance(event, (Finished, Failed)):
            result.append(event)
            done.set()

    job = Job("generate", adapter, list(ids), emit, time.monotonic() + 600,
              GenerationParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True))
    with Clock() as clock:
        engine.submit([job])
        assert done.wait(600), "the engine did not answer"
    event = result[0]
    assert isinstance(event, Finished), event
    return {"wall_s": clock.wall, "cpu_s": clock.cpu, "first_token_s": (first[0] if first else time.perf_counter())
            - clock.wall0, "tokens": float(event.completion_tokens)}


def hf_generate(model: Any, ids: list[int], new_tokens: int) -> dict[str, float]:
    """``generate`` of exactly ``new_tokens`` greedy tokens: wall and CPU seconds."""
    inputs = torch.tensor([ids], device=model.device)
    with torch.no_grad(), Clock() as clock:
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    assert out.shape[1] - inputs.shape[1] == new_tokens
    return {"wall_s": clock.wall, "cpu_s": clock.cpu, "tokens": new_tokens}


def profile_decode(lm: Any, hf_model: Any, bundle: Path, task: str, ids: list[int], new_tokens: int,
                   top: int = 8) -> dict[str, Any]:
    """Where a decode token's time goes, talora against HF: torch.profiler over a greedy generation of
    ``new_tokens`` (talora through ``greedy_generate``, the engine's step on the calling thread, which
    the profiler sees; HF through ``generate``), per generated token: aten ops, self CPU ms, and the
    ``top`` ops by self time. The profiler's own cost inflates small ops alike on both sides."""
    from torch.profiler import ProfilerActivity, profile

    from talora.adapters.formats.bundle import model_from_bundle
    from talora.adapters.runtime.decoding import greedy_generate

    model, _, _ = model_from_bundle(lm, bundle, None, [task])
    with torch.no_grad():
        prefix = model.shared_kv()
        slots = model.task_slots(prefix, [task])
    runs = {"talora": lambda: greedy_generate(model, prefix, slots, [ids], [0], new_tokens, set()),
            "hf": lambda: hf_generate(hf_model, ids, new_tokens)}
    out: dict[str, Any] = {}
    for name, run in runs.items():
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        events = prof.key_averages()
        ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
        out[name] = {"ops_per_token": sum(e.count for e in events) / new_tokens,
                     "self_cpu_ms_per_token": sum(e.self_cpu_time_total for e in events) / 1e3 / new_tokens,
                     "top": {e.key: {"calls_per_token": e.count / new_tokens,
                                     "self_cpu_ms_per_token": e.self_cpu_time_total / 1e3 / new_tokens}
                             for e in ranked}}
    return out


def hf_reference(model: str, dtype: str) -> Any:
    """The same checkpoint as transformers' own model class (the embedded default: its converted folder)."""
    from transformers import AutoModelForCausalLM

    from talora.adapters.model.loading import default_model_dir

    folder = default_model_dir() if model == "smollm2-135m-instruct" else Path(model)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()


def measure(args: argparse.Namespace, threads: int, engine: Any, adapter: Any, model: Any,
            ids: list[int]) -> dict[str, Any]:
    torch.set_num_threads(threads)
    talora_generate(engine, adapter, ids, args.new_tokens)  # warm-up: task KV, buffers
    tokens = args.new_tokens  # both run through end-of-sequence tokens
    hf_generate(model, ids, tokens)
    rows: dict[str, list[dict[str, float]]] = {"talora": [], "hf": [], "talora_first": [], "hf_first": []}
    for _ in range(args.repeats):
        rows["talora"].append(talora_generate(engine, adapter, ids, tokens))
        rows["hf"].append(hf_generate(model, ids, tokens))
        rows["hf_first"].append(hf_generate(model, ids, 1))

    assert all(r["tokens"] == tokens for r in rows["talora"]), "talora stopped early"

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    out: dict[str, Any] = {"threads": threads, "tokens": tokens, "prompt_tokens": len(ids)}
    for name in ("talora", "hf"):
        out[name] = {"tokens_per_s_wall": tokens / median(name, "wall_s"),
                     "cpu_ms_per_token": 1e3 * median(name, "cpu_s") / tokens,
                     "cores_busy": median(name, "cpu_s") / median(name, "wall_s")}  # ~threads when they all work
    out["talora"]["first_token_ms"] = 1e3 * median("talora", "first_token_s")
    out["hf"]["first_token_ms"] = 1e3 * median("hf_first", "wall_s")
    out["ratios"] = {
        "tokens_per_s_wall": out["talora"]["tokens_per_s_wall"] / out["hf"]["tokens_per_s_wall"],
        "tokens_per_cpu_s": out["hf"]["cpu_ms_per_token"] / out["talora"]["cpu_ms_per_token"],
        "first_token_latency": out["talora"]["first_token_ms"] / out["hf"]["first_token_ms"]}
    # each round runs the two back to back: its own ratio cancels the machine's drift between rounds
    pairs = {"tokens_per_s_wall": [h["wall_s"] / t["wall_s"] for t, h in zip(rows["talora"], rows["hf"])],
             "first_token_latency": [t["first_token_s"] / h["wall_s"]
                                     for t, h in zip(rows["talora"], rows["hf_first"])]}
    out["round_ratios"] = {key: {"median": statistics.median(values), "min": min(values), "max": max(values),
                                 "rounds": values} for key, values in pairs.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from talora.adapters.demo import demo_bundle_dir
    from talora.adapters.model.loading import load_model
    from talora.server.engine import Engine
    from talora.server.settings import Settings

    lm = load_model(args.model, args.dtype, "cpu")
    hf_model = hf_reference(args.model, args.dtype)
    rows: list[dict[str, Any]] = []
    ids: list[int] = []
    for threads in (int(t) for t in args.threads.split(",")):
        # one engine per thread count, started with it: torch's thread count is per thread (OpenMP), and
        # a worker thread takes the process-wide setting when it first runs an op, so setting it later
        # from this thread would leave the engine's worker on its old count
        engine = Engine(Settings(bundle=demo_bundle_dir(), model=args.model, dtype=args.dtype, num_slots=2,
                                 torch_threads=threads, log_level="warning").engine_config(), loaded=lm)
        engine.start()
        try:
            adapter = engine.adapter(args.task)
            ids, _ = engine.encode(adapter, PROMPT, "What happens?" if "{question}" in adapter.meta.template else None)
            row = measure(args, threads, engine, adapter, hf_model, ids)
        finally:
            engine.stop(10)
        rows.append(row)
        print(f"{threads} thread(s): talora {row['talora']}, HF {row['hf']}, ratios {row['ratios']}", flush=True)
    summary: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "task": args.task, "rows": rows,
                               "machine": machine_info(None)}
    if args.profile:
        torch.set_num_threads(1)
        summary["profile"] = profile_decode(lm.model, hf_model, demo_bundle_dir(), args.task, ids, args.new_tokens)
        for name, row in summary["profile"].items():
            print(f"profile {name}: {row['ops_per_token']:.0f} ops and {row['self_cpu_ms_per_token']:.1f} ms "
                  f"self CPU per token", flush=True)
    write_json(args.out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
