"""Smoke test of ``benchmarks/serving/serving_costs.py`` at tiny sizes: every setup runs, old and new give the
same text and tokens, and one JSONL row per setup is written with its timings and ratio."""

from __future__ import annotations

import json

from benchmarks.serving import serving_costs


def test_serving_costs_runs_in_smoke_mode(tmp_path, capsys):
    out = tmp_path / "costs.jsonl"
    serving_costs.main(["--smoke", "--jsonl", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["setup"], r.get("rows")) for r in rows] == [("detokeniser", None), ("sampler", 1), ("sampler", 4)]
    assert rows[0]["same_output"] and all(r["same_tokens"] for r in rows[1:])
    assert all(r["smoke"] and r["old_s"] > 0 and r["new_s"] > 0 and r["old_over_new"] > 0 for r in rows)
    assert "machine" in rows[0] and len(capsys.readouterr().out.splitlines()) == 3
