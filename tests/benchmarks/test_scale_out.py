"""benchmarks/scale_out.py: the summary's ratios (default suite), and a smoke run on the tiny model (``-m ray``)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

from benchmarks import scale_out


def test_summary_ratios_compare_setups_of_the_same_mix():
    rows = {"zipf64": {"one": {"requests_per_s": 10.0, "slot_hit_rate": 0.5},
                       "two": {"requests_per_s": 18.0, "slot_hit_rate": 0.9},
                       "two_random": {"requests_per_s": 17.0, "slot_hit_rate": 0.6}},
            "zipf1000": {"one": {"requests_per_s": 8.0, "slot_hit_rate": 0.2}}}
    args = Namespace(tasks="64,1000", out=Path("x"), jsonl=None)
    summary = scale_out.summarise(args, rows, {"cpu_count": 2})
    assert summary["ratios"]["two_replicas_vs_one"] == {"zipf64": pytest.approx(1.8), "zipf1000": None}
    assert summary["ratios"]["affine_vs_random_hit_rate"] == {"zipf64": pytest.approx(1.5), "zipf1000": None}
    assert summary["setup"] == {"tasks": "64,1000"}


def test_texts_are_seeded():
    assert scale_out.make_texts(5, 1) == scale_out.make_texts(5, 1) != scale_out.make_texts(5, 2)


@pytest.mark.ray
def test_a_tiny_run_writes_every_setup_and_both_ratios(tmp_path):
    pytest.importorskip("ray.serve")
    from tests.helpers import save_tiny_server_model

    model = save_tiny_server_model(tmp_path / "model")
    out = tmp_path / "scale_out.json"
    assert scale_out.main(["--model", str(model), "--tasks", "6", "--duration-s", "1", "--warmup-requests", "8",
                           "--concurrency", "4", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    rows = summary["rows"]["zipf6"]
    assert set(rows) == set(scale_out.SETUPS)
    assert all(row["completed"] > 0 and not row["errors"] for row in rows.values())
    assert [len(rows[name]["replica_shares"]) for name in scale_out.SETUPS] == [1, 2, 2]
    assert all(sum(row["replica_shares"]) == pytest.approx(1) for row in rows.values())
    assert summary["ratios"]["two_replicas_vs_one"]["zipf6"] > 0
    assert summary["ratios"]["affine_vs_random_hit_rate"]["zipf6"] > 0
