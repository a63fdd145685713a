"""The benchmark harness's bookkeeping: request sets, task popularity, the summary JSON."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from benchmarks.harness.report import REQUIRED_RATIOS, serve_bench_summary, write_json
from benchmarks.harness.request_set import (
    assign_tasks,
    build_request_set,
    grouped_by_task,
    load_request_set,
    save_request_set,
    zipf_weights,
)

TEXTS = {"alpha": ["one two three four five", "six seven"], "beta": ["a b c d e f g h i j k"] * 3}


def encode(text: str) -> list[int]:
    return [len(word) + 100 * i for i, word in enumerate(text.split())]


def test_request_set_is_deterministic_with_lengths_in_range():
    first = build_request_set(TEXTS, encode, num_requests=300, min_tokens=16, max_tokens=128, seed=3)
    again = build_request_set(TEXTS, encode, num_requests=300, min_tokens=16, max_tokens=128, seed=3)
    other = build_request_set(TEXTS, encode, num_requests=300, min_tokens=16, max_tokens=128, seed=4)
    assert first == again
    assert first != other
    lengths = [len(r.input_ids) for r in first]
    assert min(lengths) >= 16 and max(lengths) <= 128
    # uniform over [16, 128]: both ends of the range are reached and the mean sits in the middle
    assert min(lengths) < 24 and max(lengths) > 120
    assert 60 < sum(lengths) / len(lengths) < 84
    assert {r.source_task for r in first} == set(TEXTS)


def test_request_set_refuses_bad_ranges_and_empty_sources():
    with pytest.raises(ValueError, match="min_tokens"):
        build_request_set(TEXTS, encode, min_tokens=10, max_tokens=5)
    with pytest.raises(ValueError, match="no source task"):
        build_request_set({"empty": []}, encode)


def test_zipf_popularity_ranks_tasks_by_one_over_rank():
    weights = zipf_weights(64, 1.0)
    assert abs(sum(weights) - 1.0) < 1e-12
    assert weights[0] / weights[1] == pytest.approx(2.0) and weights[0] / weights[9] == pytest.approx(10.0)
    draws = assign_tasks(20000, 64, "zipf", seed=0)
    counts = Counter(draws)
    assert counts[0] / len(draws) == pytest.approx(weights[0], abs=0.02)
    assert counts[0] > counts[1] > counts[7] > counts[40]
    assert assign_tasks(100, 64, "zipf", seed=5) == assign_tasks(100, 64, "zipf", seed=5)
    uniform = Counter(assign_tasks(8000, 8, "uniform", seed=0))
    assert set(uniform) == set(range(8)) and max(uniform.values()) < 1.2 * min(uniform.values())
    with pytest.raises(ValueError, match="popularity"):
        assign_tasks(10, 4, "pareto")


def test_grouped_batches_hold_one_task_each_and_cover_every_request():
    task_ids = assign_tasks(200, 16, "zipf", seed=1)
    groups = grouped_by_task(task_ids, batch_size=8)
    assert sorted(i for g in groups for i in g) == list(range(200))
    assert all(len(g) <= 8 and len({task_ids[i] for i in g}) == 1 for g in groups)


def test_request_set_round_trips_through_jsonl(tmp_path):
    requests = build_request_set(TEXTS, encode, num_requests=20, seed=0)
    task_ids = assign_tasks(20, 4, "zipf", seed=0)
    save_request_set(tmp_path / "r.jsonl", requests, task_ids)
    assert load_request_set(tmp_path / "r.jsonl") == (requests, task_ids)


def test_summary_has_the_required_ratios_and_setup(tmp_path):
    rows = {"bare_packed": {"input_tokens_per_s": 200.0, "cpu_time_input_tokens_per_s": 250.0},
            "talora_mixed64": {"input_tokens_per_s": 190.0, "cpu_time_input_tokens_per_s": 240.0},
            "peft_grouped_mixed64": {"input_tokens_per_s": 50.0, "cpu_time_input_tokens_per_s": 60.0},
            "vllm_prompt_embeds_mixed64": {"input_tokens_per_s": None, "skipped": "not installed"}}
    summary = serve_bench_summary({"threads": 1}, {"platform": "x"}, rows, "bare_packed")
    write_json(tmp_path / "s.json", summary)
    loaded = json.loads((tmp_path / "s.json").read_text())
    assert set(REQUIRED_RATIOS) <= set(loaded["ratios"])
    assert loaded["ratios"]["talora_mixed64_vs_bare"] == pytest.approx(0.95)
    assert loaded["ratios"]["talora_mixed64_vs_peft"] == pytest.approx(3.8)
    assert loaded["ratios"]["talora_mixed64_vs_vllm"] is None
    assert loaded["throughputs"]["talora_mixed64"]["input_tokens_per_s"] == 190.0
    assert loaded["setup"] == {"threads": 1} and loaded["machine"] == {"platform": "x"}


def test_plots_without_matplotlib_name_the_bench_extra(monkeypatch):
    import sys

    from benchmarks.harness.report import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'talora\[bench\]'"):
        pyplot()
