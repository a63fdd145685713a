"""benchmarks/serving/engine_overhead.py: an old revision exported as ``talora``, and old and new engines
measured side by side on CPU (slow)."""

from __future__ import annotations

import json

import pytest


def test_engine_overhead_exports_an_old_revision_as_talora(tmp_path):
    from benchmarks.serving import engine_overhead

    root = engine_overhead.export_ref("HEAD", tmp_path)
    assert (root / "talora" / "server" / "engine" / "core.py").is_file()
    assert (root / "talora" / "adapters" / "model" / "talora_model.py").is_file()


@pytest.mark.slow
def test_engine_overhead_runs_old_and_new_on_cpu(tmp_path):
    from benchmarks.serving import engine_overhead

    out = tmp_path / "overhead.json"
    engine_overhead.main(["--device", "cpu", "--models", "tiny", "--requests", "tiny=8", "--batch-size", "4",
                          "--repeats", "1", "--old-ref", "HEAD", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert set(summary["ratios"]) == {"tiny_engine_vs_forward", "old_tiny_engine_vs_forward"}
    assert summary["results"]["tiny"]["profile"]["steps"] == 2
