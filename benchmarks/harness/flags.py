"""The command-line flags the benchmark scripts share, each defined once with its type and help.

A script names the shared flags it takes with their defaults, and keeps its own flags beside them:

    p = bench_parser(__doc__)
    add_flags(p, min_tokens=16, max_tokens=128, threads=1, repeats=3, seed=0,
              out=SERVING_RESULTS / "serve_bench.json", helps={"threads": "torch threads for every setup"})
    p.add_argument("--setups", ...)

Flags are kebab-case copies of the names (``min_tokens`` -> ``--min-tokens``). Default output
paths lie in the suite's results folder (``paths.SERVING_RESULTS`` and its siblings).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

FLAGS: dict[str, tuple[type, str]] = {  # name: (type, help)
    "num_requests": (int, "requests in the set"),
    "min_tokens": (int, "shortest input, tokens"),
    "max_tokens": (int, "longest input, tokens"),
    "shared_prompt_len": (int, "m, shared soft-prompt rows"),
    "task_prompt_len": (int, "n, task-prompt rows"),
    "rank": (int, "r, rank of the shared basis"),
    "batch_size": (int, "requests per forward for every setup"),
    "repeats": (int, "timed rounds (median taken)"),
    "threads": (int, "torch threads"),
    "seed": (int, "seed of the request set and the task draws"),
    "out": (Path, "summary JSON"),
    "jsonl": (Path, "raw rows, one JSON line each (appended)"),
}


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser, described by the first line of its module docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n")[0])


def add_flags(parser: argparse.ArgumentParser, helps: dict[str, str] | None = None, **defaults: Any) -> None:
    """Add the shared flags named in ``defaults`` (name=default), in that order; ``helps`` overrides a help."""
    for name, default in defaults.items():
        kind, help_text = FLAGS[name]
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=default,
                            help=(helps or {}).get(name, help_text))
