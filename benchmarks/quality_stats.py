"""Paired comparisons of two methods of the quality benchmark, with bootstrap intervals.

The unit is a test item of a target task under a target seed: both methods answered the same
item (same test subset) after training on the same data draw (same seed). A multi-task method
with several source stages contributes the mean correctness over its source seeds per unit.

``paired_bootstrap`` resamples, independently for every task, the target seeds and the items
(a two-way bootstrap: seed-to-seed and item-to-item variation both enter the interval), takes
the mean difference within each task, and averages the tasks with equal weight, which is how
the headline "mean target accuracy" is formed.

The interval holds the source stages fixed: with two source seeds per multi-task method, their
variance cannot be estimated well, so ``by_source_seed`` repeats each comparison on one source
stage at a time (a method without a source stage enters every one of them whole).
"""
from __future__ import annotations

import numpy as np

HEADLINE_BASELINES = ("prompt_tuning", "mpt", "lora")


def correctness(results: list[dict], method: str, setting: str,
                source_seed: int | None = None) -> dict[str, dict[int, np.ndarray]]:
    """task -> target seed -> per-item correctness (0/1, or the mean over source seeds).
    ``source_seed``: only the runs from that source stage (runs without one are always kept)."""
    grouped: dict[str, dict[int, list[np.ndarray]]] = {}
    for r in results:
        if r["method"] != method or r["stage"] != "target" or r["setting"] != setting:
            continue
        if source_seed is not None and r.get("source_seed") not in (None, source_seed):
            continue
        pred = np.frombuffer(r["predictions"][r["task"]].encode(), dtype=np.uint8)
        gold = np.frombuffer(r["gold"][r["task"]].encode(), dtype=np.uint8)
        grouped.setdefault(r["task"], {}).setdefault(r["seed"], []).append((pred == gold).astype(float))
    return {task: {seed: np.mean(runs, axis=0) for seed, runs in seeds.items()} for task, seeds in grouped.items()}


def _paired_matrix(a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> np.ndarray | None:
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    return np.stack([a[s] - b[s] for s in seeds])  # (seeds, items)


def paired_bootstrap(a: dict[str, dict[int, np.ndarray]], b: dict[str, dict[int, np.ndarray]],
                     n_boot: int = 10_000, seed: int = 0, level: float = 0.90) -> dict | None:
    """Mean difference a - b over tasks, its ``level`` bootstrap interval, and the unit count;
    None when the methods share no (task, seed)."""
    rng = np.random.default_rng(seed)
    tasks = sorted(set(a) & set(b))
    mats = {t: m for t in tasks if (m := _paired_matrix(a[t], b[t])) is not None}
    if not mats:
        return None
    boot = np.zeros(n_boot)
    for mat in mats.values():
        n_seeds, n_items = mat.shape
        seed_idx = rng.integers(0, n_seeds, (n_boot, n_seeds))
        item_idx = rng.integers(0, n_items, (n_boot, n_items))
        # mean over resampled seeds and items = mean over seeds of (row means at resampled items)
        per_seed_item_means = np.stack([mat[:, idx].mean(axis=1) for idx in item_idx])  # (n_boot, n_seeds)
        boot += np.take_along_axis(per_seed_item_means, seed_idx, axis=1).mean(axis=1)
    boot /= len(mats)
    diff = float(np.mean([m.mean() for m in mats.values()]))
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff_mean": round(diff, 4), f"ci{int(level * 100)}": [round(float(lo), 4), round(float(hi), 4)],
            "n_items": int(sum(m.size for m in mats.values())), "tasks": sorted(mats),
            "seeds": sorted({s for t in mats for s in set(a[t]) & set(b[t])})}


def like_stages(results: list[dict], a: str, b: str, setting: str) -> list[dict]:
    """``results`` less the target runs of ``a`` and ``b`` in ``setting`` that the other method has
    no run of from the same source stage (same task and target seed), so that a pooled comparison of
    two multi-task methods pairs like source stages even where one has runs from fewer stages; a
    method without a source stage pairs with every stage."""
    stages: dict[tuple, set] = {}
    for r in results:
        if r["method"] in (a, b) and r["stage"] == "target" and r["setting"] == setting:
            stages.setdefault((r["method"], r["task"], r["seed"]), set()).add(r.get("source_seed"))

    def keep(r: dict) -> bool:
        if r["method"] not in (a, b) or r["stage"] != "target" or r["setting"] != setting:
            return True
        other = stages.get((b if r["method"] == a else a, r["task"], r["seed"]), set())
        return r.get("source_seed") is None or None in other or r.get("source_seed") in other

    return [r for r in results if keep(r)]


def comparisons(results: list[dict], settings: tuple[str, ...], a: str = "talora",
                baselines: tuple[str, ...] = HEADLINE_BASELINES, n_boot: int = 10_000,
                source_seed: int | None = None) -> list[dict]:
    """``{"a", "b", "setting", "diff_mean", "ci90", "n_items", ...}`` for ``a`` against each baseline.
    ``source_seed``: both sides' runs from that source stage only (``correctness``)."""
    out = []
    for setting in settings:
        for b in baselines:
            like = like_stages(results, a, b, setting)
            found = paired_bootstrap(correctness(like, a, setting, source_seed),
                                     correctness(like, b, setting, source_seed), n_boot=n_boot)
            if found is not None:
                out.append({"a": a, "b": b, "setting": setting, **found})
    return out


def by_source_seed(results: list[dict], settings: tuple[str, ...], a: str = "talora",
                   baselines: tuple[str, ...] = HEADLINE_BASELINES, n_boot: int = 10_000) -> list[dict]:
    """``comparisons`` on one source stage at a time: ``a``'s runs from source seed s against the
    baseline's runs from the same source seed s (all of a baseline's runs when it has no source
    stage); a row per (setting, source seed, baseline) that both have runs for."""
    seeds = sorted({r["source_seed"] for r in results
                    if r["method"] == a and r["stage"] == "target" and r.get("source_seed") is not None})
    return [{**c, "source_seed": s} for setting in settings for s in seeds
            for c in comparisons(results, (setting,), a, baselines, n_boot, source_seed=s)]


def budget_comparisons(now: list[dict], before: list[dict], settings: tuple[str, ...],
                       n_boot: int = 10_000) -> list[dict]:
    """Each method's target runs ``now`` against its runs ``before`` (the same runs under another
    budget: same tasks, target seeds, items), one source stage at a time (a method without one,
    whole): ``{"method", "setting", "source_seed", "diff_mean", "ci90", "n_items", ...}``."""
    pooled = [{**r, "method": f"{r['method']}@now"} for r in now] + \
             [{**r, "method": f"{r['method']}@before"} for r in before]
    out = []
    for setting in settings:
        mine = [r for r in now if r["stage"] == "target" and r["setting"] == setting]
        for method in sorted({r["method"] for r in mine}):
            seeds = sorted({r.get("source_seed") for r in mine if r["method"] == method}, key=lambda s: s or 0)
            for s in seeds:
                for c in comparisons(pooled, (setting,), f"{method}@now", (f"{method}@before",), n_boot, s):
                    out.append({**c, "method": method, "source_seed": s})
    return out


def kernel_path(record: dict) -> tuple[str, str]:
    """Where a run's arithmetic came from: the CPU (or GPU) model of its recorded machine and how its
    16-bit products ran (``"half_matmul"``: ``"native"``, ``"float32"``; empty for float32 models and
    for records made before the field was kept)."""
    return record.get("machine", "").split(",")[0], record.get("half_matmul") or ""


def rerun_report(stored: list[dict], reruns: list[dict], settings: tuple[str, ...], a: str = "talora",
                 baselines: tuple[str, ...] = HEADLINE_BASELINES, n_boot: int = 10_000) -> dict:
    """What reruns of stored runs on another machine or kernel path (``verify_runs`` with a
    ``keep_dir``) say. ``"shift"``: each method's reruns against the same runs as stored (rerun -
    stored, per source stage). ``"same_path"``: ``a`` against each baseline among the runs made on
    the reruns' path only, the reruns and the stored runs with the same ``kernel_path``, pooled and
    per source stage, so that no comparison mixes two paths."""
    keys = {r["key"] for r in reruns}
    stored_of = [r for r in stored if r["key"] in keys]
    paths = {kernel_path(r) for r in reruns}
    pool = [r for r in stored if r["key"] not in keys and kernel_path(r) in paths] + reruns
    same_path = [{**c, "source_seed": None} for c in comparisons(pool, settings, a, baselines, n_boot)]
    same_path += by_source_seed(pool, settings, a, baselines, n_boot)
    return {"paths": [list(p) for p in sorted(paths)],
            "reruns": len(reruns),
            "shift": budget_comparisons(reruns, stored_of, settings, n_boot),
            "same_path": same_path,
            "same_path_runs": {m: sum(r["method"] == m and r["stage"] == "target" for r in pool)
                               for m in (a, *baselines)}}
