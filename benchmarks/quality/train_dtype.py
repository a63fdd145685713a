"""Training speed and accuracy of a bfloat16 frozen model against float32, in one run.

Times the TA-LoRA training step of the recipe (``talora.adapters.train.recipe``) on the embedded
SmolLM2-135M for a source batch (mixed tasks, P and A trained) and a target batch (one task, B_t
and g_t only), float32 and bfloat16 interleaved (A B A B ...) so that machine noise hits both;
then trains the same short target stage from the same start in both dtypes and scores both on
the same dev items. Writes ``benchmarks/results/quality/train_dtype.json``:

    python -m benchmarks.quality.train_dtype                    # ~6 minutes on a 2-core CPU
    python -m benchmarks.quality.train_dtype --repeats 3 --eval-limit 60 --target-steps 8   # quick look

The adapter tensors stay float32 in both (``--dtype bfloat16`` of ``talora-train``: the frozen
model runs in bfloat16, the trained tensors are float32 master copies cast where used).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness.paths import QUALITY_RESULTS
from benchmarks.harness.report import cpu_model
from talora.adapters.model.precision import float_matmul_needed, native_half

DTYPES = ("float32", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=8, help="timed steps per dtype and stage (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--task", default="tweet_sentiment", help="target task of the accuracy check")
    p.add_argument("--target-steps", type=int, default=48,
                   help="steps of the accuracy check's target stage (0: skip the check, keep the stored one)")
    p.add_argument("--eval-limit", type=int, default=240, help="dev items of the accuracy check")
    p.add_argument("--out", type=Path, default=QUALITY_RESULTS / "train_dtype.json")
    return p.parse_args(argv)


def _setup(dtype: str, task_names: list[str], target: str, seed: int = 0):
    from talora.adapters.data import get_task, load_split
    from talora.adapters.model.loading import load_model
    from talora.adapters.model.talora_model import TaloraModel
    from talora.adapters.train import recipe
    from talora.adapters.train.data import encode_task

    cfg = recipe.source_config(tasks=task_names, dtype=dtype)
    loaded = load_model(cfg.model, dtype, "cpu")
    model = TaloraModel(loaded.model, cfg.talora(), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    model.init_shared(gen, cfg.basis_init)
    encoded = {}
    for name in [*task_names, target]:
        model.add_task(name, generator=gen)
        encoded[name] = encode_task(get_task(name), load_split(name, "train", limit=64), loaded.tokenizer,
                                    cfg.max_input_tokens)
    with torch.no_grad():
        for name in model.tasks:
            model.adapter(name).gate.fill_(0.1)  # an open gate, as after the first steps
    return cfg, model, encoded


def time_steps(repeats: int, sources: list[str], target: str) -> dict:
    """Median seconds of a source and a target step per dtype, measured interleaved."""
    from talora.adapters.train.objective import AnswerLoss, pack_batch
    from talora.adapters.train.recipe import SOURCE, TARGET

    setups = {d: _setup(d, sources, target) for d in DTYPES}
    times: dict[tuple[str, str], list[float]] = {}
    for i in range(repeats + 1):
        for dtype, (_, model, encoded) in setups.items():
            for stage in ("source", "target"):
                names = sources if stage == "source" else [target]
                size = SOURCE["batch_size"] if stage == "source" else TARGET["batch_size"]
                items = [(names[j % len(names)], encoded[names[j % len(names)]].examples[(i * size + j) % 64])
                         for j in range(size)]
                trained = [model.tasks[n].fast for n in names] + [model.tasks[n].gate for n in names]
                trained += [model.prompt, model.basis] if stage == "source" else []
                for p in model.parameters():
                    p.requires_grad_(False)
                for p in trained:
                    p.requires_grad_(True)
                tic = time.perf_counter()
                loss = AnswerLoss(model)(pack_batch(items))
                loss.backward()
                if i:  # the first round is a warm-up
                    times.setdefault((dtype, stage), []).append(time.perf_counter() - tic)
                model.zero_grad(set_to_none=True)
    return {f"{d}/{s}": statistics.median(v) for (d, s), v in times.items()}


def accuracy_check(task: str, steps: int, eval_limit: int, sources: list[str]) -> dict:
    """Train the same target stage (same seed, same draws) in both dtypes; dev accuracy of each."""
    import tempfile

    from talora.adapters.train import recipe, run_source, run_target

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = recipe.source_config(tasks=sources, steps=16, output_dir=f"{tmp}/src", eval_limit=16, save_every=0,
                                   progress=False)
        bundle = run_source(src)["bundle"]  # one short float32 source stage: both targets start from it
        for dtype in DTYPES:
            tgt = recipe.target_config(task=task, bundle=bundle, steps=steps, dtype=dtype, split="dev",
                                       eval_limit=eval_limit, output_dir=f"{tmp}/tgt-{dtype}", progress=False)
            summary = run_target(tgt)
            out[dtype] = {"dev_accuracy": summary["metrics"][task]["accuracy"], "final_loss": summary["final_loss"],
                          "seconds_per_step": summary["seconds_per_step"]}
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    sources = ["bbc_topic", "inews_sentiment", "multiemo_zh"]
    steps = time_steps(args.repeats, sources, args.task)
    ratios = {stage: steps[f"float32/{stage}"] / steps[f"bfloat16/{stage}"] for stage in ("source", "target")}
    check: dict | None
    if args.target_steps:
        check = {"task": args.task, "split": "dev", "target_steps": args.target_steps, "eval_limit": args.eval_limit,
                 **accuracy_check(args.task, args.target_steps, args.eval_limit, sources)}
    else:  # timing only: keep the accuracy check of the stored file
        check = json.loads(args.out.read_text())["accuracy_check"] if args.out.is_file() else None
    doc = {"command": "python -m benchmarks.quality.train_dtype " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                      f"torch {torch.__version__}",
           "cpu": {"model": cpu_model(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
                   "native_bfloat16": native_half(torch.bfloat16),
                   "float_matmul": float_matmul_needed(torch.bfloat16, "cpu")},
           "step_seconds_median": {k: round(v, 3) for k, v in steps.items()},
           "ratios": {f"bf16_speedup_{k}_step": round(v, 3) for k, v in ratios.items()},
           "load_average": {"start": load_before, "end": os.getloadavg()[0]}, "accuracy_check": check}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
