"""Where the benchmarks keep what they write: one results folder per suite, one scratch folder.

Every script's default ``--out`` (or ``--jsonl``, ``--plot``) lies in its suite's folder:

    add_flags(p, out=SERVING_RESULTS / "memory_scale.json")

Summaries there are committed; raw JSONL rows and everything under ``SCRATCH`` are git-ignored.
"""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]  # the benchmarks/ folder
REPO_ROOT = BENCHMARKS.parent  # where ``python -m benchmarks.<suite>.<name>`` runs from
RESULTS = BENCHMARKS / "results"
SERVING_RESULTS = RESULTS / "serving"  # benchmarks.serving: throughput, latency, memory, scale-out
KERNELS_RESULTS = RESULTS / "kernels"  # benchmarks.kernels: kernel timings, decode sweeps, PTX diffs
QUALITY_RESULTS = RESULTS / "quality"  # benchmarks.quality: accuracy, stored runs and source weights
SCRATCH = BENCHMARKS / "runs"  # work folders of long runs (weights, task files; git-ignored)
