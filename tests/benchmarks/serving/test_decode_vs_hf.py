"""benchmarks/serving/decode_vs_hf.py on the real default model (slow)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_decode_vs_hf_runs_both_sides_to_the_same_length(tmp_path):
    """The real default model: both sides make exactly the tokens asked for, ratios and a profile are written."""
    import json

    from benchmarks.serving import decode_vs_hf

    out = tmp_path / "dvh.json"
    assert decode_vs_hf.main(["--threads", "1", "--new-tokens", "4", "--repeats", "1", "--profile",
                              "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    row = summary["rows"][0]
    assert row["tokens"] == 4 and set(row["ratios"]) == {"tokens_per_s_wall", "tokens_per_cpu_s", "first_token_latency"}
    assert all(v > 0 for v in row["ratios"].values())
    for ratios in row["round_ratios"].values():  # one round: its own ratio is the whole spread
        assert len(ratios["rounds"]) == 1 and ratios["min"] == ratios["median"] == ratios["max"] > 0
    assert row["talora"]["cores_busy"] > 0.5  # the engine's worker ran on the row's one thread
    assert row["talora"]["cores_busy"] < 1.2
    for side in ("talora", "hf"):
        assert summary["profile"][side]["ops_per_token"] > 0 and summary["profile"][side]["top"]
