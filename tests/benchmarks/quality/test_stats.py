"""The hierarchical bootstrap of the quality benchmark: source stages as a random effect (issue 35)."""
from __future__ import annotations

import numpy as np

from benchmarks.quality import stats as qs

TASKS = ("t1", "t2", "t3")


def _runs(method: str, stage_accuracy: dict, seeds=range(5), items: int = 200, salt: int = 0) -> list[dict]:
    """Fake target records: per source stage (None: no source stage) each item right with that stage's
    accuracy, drawn independently per (task, stage, target seed)."""
    out = []
    for t_index, task in enumerate(TASKS):
        gold = "0" * items
        for stage, accuracy in stage_accuracy.items():
            for seed in seeds:
                rng = np.random.default_rng([salt, t_index, 99 if stage is None else stage, seed])
                pred = "".join("0" if rng.random() < accuracy else "1" for _ in range(items))
                out.append({"method": method, "stage": "target", "setting": "k16", "task": task, "seed": seed,
                            "source_seed": stage, "predictions": {task: pred}, "gold": {task: gold}})
    return out


def _width(ci) -> float:
    return ci[1] - ci[0]


def test_source_stage_variance_widens_the_interval_and_takes_back_a_better():
    # a: one good and one poor source stage (mean 0.70); b: two alike (0.62). Held fixed, the stages'
    # mean difference looks certain; as a random effect two stages cannot show it
    results = _runs("a", {0: 0.90, 1: 0.50}, salt=1) + _runs("b", {0: 0.62, 1: 0.62}, salt=2)
    ca, cb = qs.stage_correctness(results, "a", "k16"), qs.stage_correctness(results, "b", "k16")
    assert sorted(ca["t1"]) == [0, 1] and sorted(ca["t1"][0]) == [0, 1, 2, 3, 4]
    staged = qs.stage_bootstrap(ca, cb, n_boot=2000)
    fixed = qs.stage_bootstrap(ca, cb, n_boot=2000, resample_stages=False)
    assert staged["diff_mean"] == fixed["diff_mean"] and abs(staged["diff_mean"] - 0.08) < 0.02
    assert fixed["ci90"][0] > 0.04  # the item and target-seed bootstrap alone: clearly ahead
    assert _width(staged["ci90"]) > 3 * _width(fixed["ci90"])
    assert staged["ci90"][0] < 0 < staged["ci90"][1]
    assert staged["stages"] == {"a": [0, 1], "b": [0, 1]} and staged["n_items"] == 3 * 5 * 200
    rows = qs.stage_comparisons(results, ("k16",), a="a", baselines=("b",), n_boot=1000)
    row = rows["comparisons"][0]
    assert row["verdict"] == "level / not shown" and row["ci90_stages_fixed"][0] > 0
    pairs = {(p["stage_a"], p["stage_b"]): p for p in rows["stage_pairs"]}
    assert sorted(pairs) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # every pair, not only like seeds
    assert pairs[0, 1]["ci90"][0] > 0 and pairs[1, 0]["ci90"][1] < 0


def test_without_source_stage_variance_the_interval_is_about_the_item_bootstraps():
    results = _runs("a", {0: 0.72, 1: 0.72}, salt=3) + _runs("b", {None: 0.55}, salt=4)
    ca, cb = qs.stage_correctness(results, "a", "k16"), qs.stage_correctness(results, "b", "k16")
    staged = qs.stage_bootstrap(ca, cb, n_boot=2000)
    fixed = qs.stage_bootstrap(ca, cb, n_boot=2000, resample_stages=False)
    assert staged["stages"]["b"] == [None]  # a method without a source stage enters whole
    assert _width(staged["ci90"]) < 1.4 * _width(fixed["ci90"])
    row = qs.stage_comparisons(results, ("k16",), a="a", baselines=("b",), n_boot=1000)["comparisons"][0]
    assert row["verdict"] == "better" and row["stage_pairs"] == 2 and row["stage_pairs_above_0"] == 2


def test_the_fixed_stage_bootstrap_is_the_two_way_paired_bootstrap():
    results = _runs("a", {0: 0.7}, salt=5) + _runs("b", {None: 0.6}, salt=6)
    staged = qs.stage_bootstrap(qs.stage_correctness(results, "a", "k16"), qs.stage_correctness(results, "b", "k16"),
                                n_boot=4000, resample_stages=False)
    old = qs.paired_bootstrap(qs.correctness(results, "a", "k16"), qs.correctness(results, "b", "k16"), n_boot=4000)
    assert staged["diff_mean"] == old["diff_mean"]
    assert np.allclose(staged["ci90"], old["ci90"], atol=0.006)  # the same bootstrap, other random draws


def test_one_source_stage_draw_serves_every_task():
    # stage 0 is good on every task and stage 1 poor on every task: the tasks cannot average the
    # stage effect away, so the interval is as wide as for one task
    one_task = [r for r in _runs("a", {0: 0.9, 1: 0.5}, salt=7) if r["task"] == "t1"]
    base = [r for r in _runs("b", {None: 0.7}, salt=8) if r["task"] == "t1"]
    three = qs.stage_bootstrap(qs.stage_correctness(_runs("a", {0: 0.9, 1: 0.5}, salt=7), "a", "k16"),
                               qs.stage_correctness(_runs("b", {None: 0.7}, salt=8), "b", "k16"), n_boot=2000)
    single = qs.stage_bootstrap(qs.stage_correctness(one_task, "a", "k16"), qs.stage_correctness(base, "b", "k16"),
                                n_boot=2000)
    assert _width(three["ci90"]) > 0.8 * _width(single["ci90"])


def test_verdict_needs_the_pooled_interval_and_most_stage_pairs():
    pooled = {"ci90": [0.01, 0.08]}
    above, across = {"ci90": [0.02, 0.09]}, {"ci90": [-0.02, 0.05]}
    assert qs.verdict(pooled, [above, above]) == "better"
    assert qs.verdict(pooled, [above, across]) == "level / not shown"  # half is not most
    assert qs.verdict(pooled, [above, above, across]) == "better"
    assert qs.verdict({"ci90": [-0.01, 0.08]}, [above, above]) == "level / not shown"
    below = {"ci90": [-0.09, -0.02]}
    assert qs.verdict({"ci90": [-0.08, -0.01]}, [below, below, below, across]) == "worse"
