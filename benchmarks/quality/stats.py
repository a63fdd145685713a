"""Paired comparisons of two methods of the quality benchmark, with bootstrap intervals.

The unit is a test item of a target task under a target seed: both methods answered the same
item (same test subset) after training on the same data draw (same seed).

``stage_bootstrap`` (the published intervals, issue 35) treats source stages as a random effect:
each multi-task method's source stages are a sample of the source stages it could have had, and a
comparison of two methods is a comparison of what they give over that distribution. Each resample
draws, with replacement, each method's source stages (the same draw for every task, since one
source stage serves all targets), and, independently for every task, the target seeds and the
items (shared by both methods: they are paired there); the difference is the mean over the drawn
units, averaged over tasks with equal weight, as the headline "mean target accuracy" is formed.
Source stages of two methods with the same seed are different trainings, so they are drawn
independently, not paired. With one source stage a method's stage-to-stage variance cannot enter
the interval (``"stages"`` says how many each side had; read such a row as holding its stage fixed).

``stage_pair_rows`` repeats each comparison on one source stage of each method at a time (every
pair, the same seed or not; a method without a source stage enters whole), with the two-way
bootstrap over (target seed, item) of ``paired_bootstrap``. ``verdict`` says what a row supports:
"better" (or "worse") only when the pooled interval excludes 0 and the lower (upper) end is above
(below) 0 on most stage pairs alone; "level / not shown" otherwise.

``paired_bootstrap`` / ``comparisons`` hold the source stages fixed (a method with several
contributes its mean correctness over them per unit); they are kept for the rerun and budget
reports, which compare runs of the same source stage.
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


def stage_correctness(results: list[dict], method: str,
                      setting: str) -> dict[str, dict[int | None, dict[int, np.ndarray]]]:
    """task -> source stage (its seed; None for a method without one) -> target seed -> per-item
    correctness (0/1) of ``method``'s target runs in ``setting``."""
    out: dict[str, dict[int | None, dict[int, np.ndarray]]] = {}
    for r in results:
        if r["method"] != method or r["stage"] != "target" or r["setting"] != setting:
            continue
        pred = np.frombuffer(r["predictions"][r["task"]].encode(), dtype=np.uint8)
        gold = np.frombuffer(r["gold"][r["task"]].encode(), dtype=np.uint8)
        out.setdefault(r["task"], {}).setdefault(r.get("source_seed"), {})[r["seed"]] = (pred == gold).astype(float)
    return out


def _stage_arrays(a: dict, b: dict) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list, list, list]:
    """Per task ``(A, B)`` of shape (stages, target seeds, items) over the source stages both methods
    have in every shared task and the target seeds every one of those stages has; with the stage
    and seed lists."""
    tasks = sorted(set(a) & set(b))
    stages_a = sorted(set.intersection(*(set(a[t]) for t in tasks)), key=_stage_order) if tasks else []
    stages_b = sorted(set.intersection(*(set(b[t]) for t in tasks)), key=_stage_order) if tasks else []
    arrays, seeds_used = {}, set()
    for t in tasks:
        seeds = set.intersection(*(set(a[t][s]) for s in stages_a), *(set(b[t][s]) for s in stages_b)) \
            if stages_a and stages_b else set()
        if not seeds:
            continue
        order = sorted(seeds)
        seeds_used |= seeds
        arrays[t] = (np.stack([np.stack([a[t][s][j] for j in order]) for s in stages_a]),
                     np.stack([np.stack([b[t][s][j] for j in order]) for s in stages_b]))
    return arrays, stages_a, stages_b, sorted(seeds_used)


def _stage_order(stage) -> int:
    return -1 if stage is None else stage


def _weights(rng: np.random.Generator, n_boot: int, n: int, resample: bool = True) -> np.ndarray:
    """(n_boot, n) resampling weights: the share of each unit among n draws with replacement."""
    if not resample or n == 0:
        return np.full((n_boot, n), 1.0 / max(n, 1))
    draws = rng.integers(0, n, (n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    return counts / n


def stage_bootstrap(a: dict, b: dict, n_boot: int = 10_000, seed: int = 0, level: float = 0.90,
                    resample_stages: bool = True) -> dict | None:
    """Mean difference a - b over tasks and its ``level`` interval from a bootstrap over (source
    stage, target seed, item): each method's source stages drawn with replacement (one draw for all
    tasks, each method its own), then per task the target seeds and the items, shared by both
    methods. ``a``, ``b``: ``stage_correctness``. ``resample_stages=False`` holds the stages fixed
    (each method's mean over its stages; the two-way bootstrap of ``paired_bootstrap``). None when
    the methods share no (task, target seed)."""
    arrays, stages_a, stages_b, seeds = _stage_arrays(a, b)
    if not arrays:
        return None
    rng = np.random.default_rng(seed)
    wa = _weights(rng, n_boot, len(stages_a), resample_stages)  # (n_boot, Sa)
    wb = _weights(rng, n_boot, len(stages_b), resample_stages)
    boot = np.zeros(n_boot)
    for arr_a, arr_b in arrays.values():
        _, n_seeds, n_items = arr_a.shape
        wj = _weights(rng, n_boot, n_seeds)  # (n_boot, J), shared by a and b: paired target seeds
        wi = _weights(rng, n_boot, n_items)  # (n_boot, I), shared: paired items
        for arr, ws, sign in ((arr_a, wa, 1.0), (arr_b, wb, -1.0)):
            per_item = arr.reshape(-1, n_items) @ wi.T  # (S*J, n_boot): item-weighted means
            per_item = per_item.reshape(arr.shape[0], n_seeds, n_boot)
            boot += sign * np.einsum("bs,bj,sjb->b", ws, wj, per_item)
    boot /= len(arrays)
    diff = float(np.mean([x.mean() - y.mean() for x, y in arrays.values()]))
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"diff_mean": round(diff, 4), f"ci{int(level * 100)}": [round(float(lo), 4), round(float(hi), 4)],
            "n_items": int(sum(x.shape[1] * x.shape[2] for x, _ in arrays.values())), "tasks": sorted(arrays),
            "seeds": seeds, "stages": {"a": stages_a, "b": stages_b}}


def stage_pair_rows(results: list[dict], setting: str, a: str, b: str, n_boot: int = 10_000) -> list[dict]:
    """``a`` against ``b`` on one source stage of each at a time, every pair of stages (a method
    without a source stage enters each whole): ``{"a", "b", "setting", "stage_a", "stage_b",
    "diff_mean", "ci90", ...}`` (two-way bootstrap over target seed and item)."""
    ca, cb = stage_correctness(results, a, setting), stage_correctness(results, b, setting)
    tasks = sorted(set(ca) & set(cb))
    stages_a = sorted({s for t in tasks for s in ca[t]}, key=_stage_order)
    stages_b = sorted({s for t in tasks for s in cb[t]}, key=_stage_order)
    rows = []
    for sa in stages_a:
        for sb in stages_b:
            one_a = {t: ca[t][sa] for t in tasks if sa in ca[t]}
            one_b = {t: cb[t][sb] for t in tasks if sb in cb[t]}
            found = paired_bootstrap(one_a, one_b, n_boot=n_boot)
            if found is not None:
                rows.append({"a": a, "b": b, "setting": setting, "stage_a": sa, "stage_b": sb, **found})
    return rows


def verdict(pooled: dict, pairs: list[dict], key: str = "ci90") -> str:
    """"better" when the pooled interval is above 0 and so is the lower end on most stage pairs alone
    (more than half), "worse" likewise below 0, else "level / not shown"."""
    lo, hi = pooled[key]
    most = len(pairs) // 2 + 1
    if lo > 0 and sum(p[key][0] > 0 for p in pairs) >= most:
        return "better"
    if hi < 0 and sum(p[key][1] < 0 for p in pairs) >= most:
        return "worse"
    return "level / not shown"


def stage_comparisons(results: list[dict], settings: tuple[str, ...], a: str = "talora",
                      baselines: tuple[str, ...] = HEADLINE_BASELINES, n_boot: int = 10_000) -> dict:
    """``{"comparisons": [...], "stage_pairs": [...]}``: ``a`` against each baseline in each setting, the
    pooled row with the bootstrap over (source stage, target seed, item) as ``ci90`` (the published
    interval), the same with source stages held fixed as ``ci90_stages_fixed``, how many stage pairs
    alone put the lower (upper) end above (below) 0, and the ``verdict``; and every stage pair's row."""
    out, pairs_out = [], []
    for setting in settings:
        for b in baselines:
            ca, cb = stage_correctness(results, a, setting), stage_correctness(results, b, setting)
            found = stage_bootstrap(ca, cb, n_boot=n_boot)
            if found is None:
                continue
            fixed = stage_bootstrap(ca, cb, n_boot=n_boot, resample_stages=False)
            assert fixed is not None  # the same data as ``found``
            pairs = stage_pair_rows(results, setting, a, b, n_boot=n_boot)
            row = {"a": a, "b": b, "setting": setting, **found, "ci90_stages_fixed": fixed["ci90"],
                   "stage_pairs": len(pairs), "stage_pairs_above_0": sum(p["ci90"][0] > 0 for p in pairs),
                   "stage_pairs_below_0": sum(p["ci90"][1] < 0 for p in pairs)}
            row["verdict"] = verdict(row, pairs)
            out.append(row)
            pairs_out += pairs
    return {"comparisons": out, "stage_pairs": pairs_out}


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
