"""Machine description, repeat timing and the JSON/JSONL writers shared by the benchmark scripts.

Every result file records where and with what it was measured (``machine_info``); ratios are
only ever taken between setups timed in the same run (``serve_bench_summary``).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REQUIRED_RATIOS = ("talora_mixed64_vs_bare", "talora_mixed64_vs_peft", "talora_mixed64_vs_vllm")


def cpu_model(unknown: str = "unknown") -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform's); ``unknown`` when neither says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or unknown


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(threads: int | None = None, extra_versions: dict[str, str | None] | None = None) -> dict:
    """Platform, CPU model and core count, thread count and library versions."""
    import os

    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "versions": {name: package_version(name) for name in ("torch", "transformers", "peft", "triton")},
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["versions"].update(extra_versions or {})
    return info


def time_repeats(run: Callable[[], object], repeats: int, sync: Callable[[], None] | None = None) -> dict:
    """Wall (``perf_counter``) and process CPU seconds of ``repeats`` calls of ``run``."""
    walls, cpus = [], []
    for _ in range(repeats):
        if sync:
            sync()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        run()
        if sync:
            sync()
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    return {"wall_s": walls, "cpu_s": cpus}


def throughput(input_tokens: int, seconds: list[float]) -> float:
    """Input tokens per second at the median of ``seconds``."""
    return input_tokens / statistics.median(seconds)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def serve_bench_summary(setup: dict, machine: dict, rows: dict[str, dict], bare_key: str,
                        notes: dict[str, str] | None = None) -> dict:
    """The committed ``serve_bench.json``: setup, machine, per-setup throughputs and ratios.

    ``rows`` maps a setup name to at least ``{"input_tokens_per_s": float | None}``; a setup
    that could not run carries ``None`` and a ``"skipped"`` reason. ``bare_key`` names the row
    used as the bare-model limit.
    """
    def tps(name: str, field: str = "input_tokens_per_s") -> float | None:
        return (rows.get(name) or {}).get(field)

    mixed = "talora_mixed64"
    ratios = {
        "talora_mixed64_vs_bare": ratio(tps(mixed), tps(bare_key)),
        "talora_mixed64_vs_peft": ratio(tps(mixed), tps("peft_grouped_mixed64")),
        "talora_mixed64_vs_vllm": ratio(tps(mixed), tps("vllm_prompt_embeds_mixed64")),
    }
    cpu_field = "cpu_time_input_tokens_per_s"
    ratios_cpu = {
        "talora_mixed64_vs_bare": ratio(tps(mixed, cpu_field), tps(bare_key, cpu_field)),
        "talora_mixed64_vs_peft": ratio(tps(mixed, cpu_field), tps("peft_grouped_mixed64", cpu_field)),
    }
    return {"setup": setup, "machine": machine, "bare_limit_row": bare_key, "throughputs": rows,
            "ratios": ratios, "ratios_cpu_time": ratios_cpu, "notes": notes or {}}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; without matplotlib, an error that names the extra."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        raise ModuleNotFoundError("the benchmark plots need matplotlib, which comes with the bench extra: "
                                  "pip install 'talora[bench]'", name="matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
