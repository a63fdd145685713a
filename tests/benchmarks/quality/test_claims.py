"""Several processes sharing one work folder split the quality plan: a claimed run is left to
its holder, a run whose holder died is taken over, and target runs wait for a source stage
that another process is training (no real training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest

from benchmarks.quality import execution as quality_exec
from benchmarks.quality import plan as qp
from benchmarks.quality import runs as quality_runs
from benchmarks.quality.claims import RunClaims
from tests.benchmarks.quality.test_quality import _fake_artifact, _fake_result
from tests.helpers import ROOT


def _holder(folder, key: str, then: str = "") -> subprocess.Popen:
    """Another process that claims ``key`` under ``folder``, says so, runs ``then`` and exits."""
    code = textwrap.dedent(f"""
        import sys, time
        from benchmarks.quality.claims import RunClaims
        claims = RunClaims({str(folder)!r})
        assert claims.claim({key!r})
        print("held", flush=True)
        sys.stdin.readline()
        {then}
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_claim_excludes_other_holders_until_released(tmp_path):
    first, second = RunClaims(tmp_path), RunClaims(tmp_path)
    assert first.claim("k") and first.claim("k")  # one's own claim again
    assert not second.claim("k")
    first.release("k")
    assert second.claim("k") and not first.claim("k")
    second.release_all()
    proc = _holder(tmp_path, "k")
    assert not first.claim("k")
    proc.communicate("\n")  # the holder exits without releasing: the kernel drops its lock
    assert first.claim("k")


def _plan():
    return qp.build_plan(replace(qp.BenchConfig(), methods=("prompt_tuning",), settings=("k16",), seeds=(0,)))


def test_a_run_another_process_holds_is_left_to_it(tmp_path, monkeypatch):
    plan = [r for r in _plan() if r.stage == "target"]
    runs, work = tmp_path / "runs", tmp_path / "work"
    held = plan[0]
    result = _fake_result(held, 0.9)
    proc = _holder(work / "claims", held.key, then=textwrap.dedent(f"""
        import json
        from benchmarks.quality import plan as qp
        qp.save_result({str(runs)!r}, {held.key!r}, json.loads({json.dumps(result)!r}))
    """).replace("\n", "\n        "))
    executed = []

    def fake_execute(run, *a, **k):
        executed.append(run.key)
        if len(executed) == len(plan) - 1:
            proc.stdin.write("\n")  # the holder finishes its run once this process has done the rest
            proc.stdin.flush()
        return _fake_result(run, 0.5)

    monkeypatch.setattr(quality_runs, "execute", fake_execute)
    assert quality_exec.execute_plan(plan, runs, work, 0, 1, False, lambda: None, poll_s=0.05) == len(plan) - 1
    proc.wait(timeout=30)
    assert held.key not in executed and sorted(executed) == sorted(r.key for r in plan[1:])
    assert qp.load_result(runs, held.key)["metrics"][held.task]["accuracy"] == 0.9


def test_a_run_whose_holder_died_is_taken_over(tmp_path, monkeypatch):
    plan = [r for r in _plan() if r.stage == "target"][:2]
    work = tmp_path / "work"
    proc = _holder(work / "claims", plan[0].key)
    executed = []

    def fake_execute(run, *a, **k):
        executed.append(run.key)
        if proc.poll() is None:
            proc.communicate("\n")  # dies holding plan[0]'s claim, with no result
        return _fake_result(run, 0.5)

    monkeypatch.setattr(quality_runs, "execute", fake_execute)
    assert quality_exec.execute_plan(plan, tmp_path / "runs", work, 0, 1, False, lambda: None, poll_s=0.05) == 2
    assert executed == [plan[1].key, plan[0].key]


def test_target_runs_wait_for_a_source_stage_another_process_trains(tmp_path, monkeypatch):
    cfg = replace(qp.BenchConfig(), methods=("talora",), settings=("k16",), seeds=(0,), source_seeds=(0,))
    plan = [r for r in qp.build_plan(cfg) if r.stage in ("source", "target")]
    source = next(r for r in plan if r.stage == "source")
    runs, work = tmp_path / "runs", tmp_path / "work"
    proc = _holder(work / "claims", source.key)
    executed = []

    def fake_execute(run, *a, **k):
        assert run.stage == "target", "the source stage belongs to the other process"
        assert (work / "artifacts" / source.key / "bundle").is_dir(), "a target run started before its source"
        executed.append(run.key)
        return _fake_result(run, 0.5)

    monkeypatch.setattr(quality_runs, "execute", fake_execute)
    sleeps = []

    def fake_sleep(seconds):  # the other process finishes its source stage while this one waits
        sleeps.append(seconds)
        if len(sleeps) == 2:
            qp.save_result(runs, source.key, _fake_result(source, 0.5))
            _fake_artifact(work, source)
            proc.communicate("\n")

    monkeypatch.setattr(quality_exec.time, "sleep", fake_sleep)
    ran = quality_exec.execute_plan(plan, runs, work, 0, 1, False, lambda: None, poll_s=7)
    assert ran == len(executed) == len(plan) - 1 and sleeps == [7, 7]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    """The holder subprocesses import ``benchmarks`` from the repository root."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
