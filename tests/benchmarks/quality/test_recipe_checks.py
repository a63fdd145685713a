"""benchmarks/quality/recipe_checks.py: one part rerun, the other part's stored results and command kept."""

from __future__ import annotations

import json

import pytest


def test_recipe_checks_rerun_one_part_and_keep_the_other(tmp_path, monkeypatch):
    from benchmarks.quality import recipe_checks

    out = tmp_path / "checks.json"
    out.write_text(json.dumps({"command": "python -m benchmarks.quality.recipe_checks", "complete": True,
                               "small_task": {"runs": [1]}, "imbalanced_task": {"runs": [0]}}))
    monkeypatch.setattr(recipe_checks, "source_bundle", lambda threads: tmp_path / "bundle")
    monkeypatch.setattr(recipe_checks, "imbalanced_task",
                        lambda bundle, seeds, tmp, threads, part, save: part.update(runs=seeds) or save())
    monkeypatch.setattr(recipe_checks, "small_task", lambda *a: pytest.fail("not asked for"))
    recipe_checks.main(["--parts", "imbalanced", "--imbalance-seeds", "2,3", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["imbalanced_task"] == {"runs": [2, 3]} and doc["small_task"] == {"runs": [1]} and doc["complete"]
    assert doc["commands"] == {"small": "python -m benchmarks.quality.recipe_checks",
                               "imbalanced": "python -m benchmarks.quality.recipe_checks --parts imbalanced "
                                             "--imbalance-seeds 2,3 --out " + str(out)}
    with pytest.raises(SystemExit, match="--parts"):
        recipe_checks.main(["--parts", "everything", "--out", str(out)])
