"""The GPU script's HTTP stage (talora-serve eager vs --cuda-graphs under load) runs end to end on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.harness.paths import REPO_ROOT
from benchmarks.harness.random_checkpoint import write_random_checkpoint

TINY = dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
            vocab_size=300)


def test_the_http_stage_serves_both_modes_and_compares_them(tmp_path):
    checkpoint = write_random_checkpoint("qwen05b-random", tmp_path / "ckpt", **TINY)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "STAGES": "http", "DEVICE": "cpu",
           "HTTP_CHECKPOINT": str(checkpoint), "HTTP_DTYPE": "float32", "HTTP_RATES": "3", "HTTP_SECONDS": "2",
           "HTTP_TOKENS": "4", "HTTP_TASKS": "3", "HTTP_SLO_MS": "20000"}
    run = subprocess.run(["bash", "benchmarks/kernels/gpu_engine_check.sh"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert "http rc=0" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    for mode in ("eager", "graphs"):
        sweep = json.loads((out / f"http_{mode}.json").read_text())["sweep"]
        assert sweep["request"] == "completions, 4 greedy tokens" and sweep["model"] == str(checkpoint)
        assert ("--cuda-graphs" in sweep["server_args"]) == (mode == "graphs")
        row = sweep["rows"][0]
        assert row["ok"] == row["sent"] > 0 and not row["errors"]
    compared = json.loads(next(out.glob("http_graphs_vs_eager-*.json")).read_text())
    assert [r["offered_rate"] for r in compared["rows"]] == [3.0]
    assert compared["rows"][0]["goodput_ratio"] > 0
