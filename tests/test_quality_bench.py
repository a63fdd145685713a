"""The quality benchmark's bookkeeping: plan, cache keys, resuming, summary rows (no training)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402
import quality_plan as qp  # noqa: E402
import quality_report as qr  # noqa: E402
import quality_runs  # noqa: E402

SMOL = {"d": 576, "L": 30, "H": 9}


def _fake_result(run: qp.Run, accuracy: float) -> dict:
    tasks = run.spec["tasks"] if run.stage == "source" else [run.task]
    metrics = {t: {"examples": 96, "accuracy": accuracy, "macro_f1": accuracy / 2, "majority_rate": 0.25}
               for t in tasks}
    return {"key": run.key, "method": run.method, "stage": run.stage, "task": run.task, "setting": run.setting,
            "seed": run.seed, "spec": run.spec, "metrics": metrics, "params_per_task": 302, "shared_params": 20736,
            "wall_s": 10.0, "seconds_per_step": 2.0, "final_loss": 1.0}


def _fake_artifact(cache: Path, run: qp.Run) -> None:
    folder = cache / quality_runs.ARTIFACTS / run.key
    if run.method in qp.TALORA_METHODS:
        (folder / "bundle").mkdir(parents=True)
    else:
        folder.mkdir(parents=True)
        (folder / "source.safetensors").write_bytes(b"")


def test_plan_is_deterministic_and_complete():
    cfg = qp.BenchConfig()
    first, second = qp.build_plan(cfg), qp.build_plan(qp.BenchConfig())
    assert [r.key for r in first] == [r.key for r in second]
    assert len({r.key for r in first}) == len(first)
    targets = [r for r in first if r.stage == "target"]
    assert len(targets) == len(qp.METHODS) * len(cfg.target_tasks) * len(qp.SETTINGS) * len(cfg.seeds)
    assert {r.method for r in first if r.stage == "source"} == set(qp.MULTITASK)
    position = {r.key: i for i, r in enumerate(first)}
    for run in targets:
        if run.method in qp.MULTITASK:
            assert position[run.spec["source"]] < position[run.key]
        else:
            assert run.spec["source"] is None
    references = [r for r in first if r.stage == "reference"]
    assert first[:len(references)] == references
    assert {r.task for r in references} == set(cfg.target_tasks) | set(cfg.source_tasks)
    assert first[len(references)].stage == "source" and targets[0].setting == "k16"


def test_keys_follow_the_configuration():
    base = qp.BenchConfig()
    changed = replace(base, talora={**base.talora, "lr": base.talora["lr"] / 2})
    old = {r.label: r.key for r in qp.build_plan(base)}
    new = {r.label: r.key for r in qp.build_plan(changed)}
    assert old.keys() == new.keys()
    for label in old:
        method = label.split("/")[0]
        assert (old[label] != new[label]) == (method in qp.TALORA_METHODS), label
    ablations = {r.method: r.key for r in qp.build_plan(base) if r.stage == "source"}
    assert len(set(ablations.values())) == len(ablations)


def test_target_overrides_reuse_the_source_stage():
    base = qp.BenchConfig()
    variant = replace(base, talora_target={"lr": 0.3})
    old = {r.label: r for r in qp.build_plan(base)}
    new = {r.label: r for r in qp.build_plan(variant)}
    for label, run in old.items():
        changed = new[label].key != run.key
        assert changed == (run.stage == "target" and run.method in qp.TALORA_METHODS), label
        if changed:
            assert new[label].spec["hyper"]["lr"] == 0.3 and new[label].spec["source"] == run.spec["source"]


def test_talora_target_flag_replaces_the_plan_recipe():
    plan_recipe = qp.BenchConfig().talora_target
    assert quality.config_from_args(quality.parse_args([])).talora_target == plan_recipe
    cfg = quality.config_from_args(quality.parse_args(["--talora-target", "lr=0.1,target_init=random"]))
    assert cfg.talora_target == {"lr": 0.1, "target_init": "random"}
    cfg = quality.config_from_args(quality.parse_args(["--talora", "slow_lr_ratio=0.3,rank=8,gated=false"]))
    assert cfg.talora == {**qp.BenchConfig().talora, "slow_lr_ratio": 0.3, "rank": 8, "gated": False}
    assert type(cfg.talora["rank"]) is int


def test_dev_split_plan_has_its_own_keys():
    test_plan = qp.build_plan(qp.BenchConfig())
    dev_plan = qp.build_plan(quality.config_from_args(quality.parse_args(["--eval-split", "dev"])))
    assert [r.label for r in dev_plan] == [r.label for r in test_plan]
    assert all(r.spec["eval_split"] == "dev" for r in dev_plan)
    assert not {r.key for r in dev_plan} & {r.key for r in test_plan}
    with pytest.raises(ValueError, match="eval_split"):
        qp.BenchConfig(eval_split="train")


def test_peft_schedule_changes_only_the_peft_keys():
    base = qp.BenchConfig()
    cosine = replace(base, peft_lr_schedule="cosine")
    old = {r.label: r for r in qp.build_plan(base)}
    for run in qp.build_plan(cosine):
        peft = run.method in ("prompt_tuning", "mpt", "lora")
        assert (run.key != old[run.label].key) == peft, run.label
        assert run.spec["hyper"].get("lr_schedule") == ("cosine" if peft else None)
    assert "lr_schedule" not in old["prompt_tuning/target/multiemo_zh/k16/s0"].spec["hyper"]


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="methods"):
        qp.BenchConfig(methods=("talora", "adapterdrop"))
    with pytest.raises(ValueError, match="held out"):
        qp.BenchConfig(target_tasks=("bbc_topic",))


def test_cached_runs_are_skipped(tmp_path, monkeypatch):
    cfg = replace(qp.BenchConfig(), methods=("talora", "prompt_tuning"), settings=("k16",), seeds=(0,))
    plan = qp.build_plan(cfg)
    missing = plan[-1]
    for run in plan[:-1]:
        qp.save_result(tmp_path, run.key, _fake_result(run, 0.5))
        if run.stage == "source":
            _fake_artifact(tmp_path, run)
    executed = []

    def fake_execute(run, cache_dir, progress=True):
        executed.append(run.key)
        return _fake_result(run, 0.6)

    monkeypatch.setattr(quality_runs, "execute", fake_execute)
    assert quality.execute_plan(plan, tmp_path, 0, False, lambda: None) == 1
    assert executed == [missing.key]
    assert qp.load_result(tmp_path, missing.key)["metrics"][missing.task]["accuracy"] == 0.6
    assert quality.execute_plan(plan, tmp_path, 0, False, lambda: None) == 0
    assert not list(tmp_path.glob("*.tmp*"))


def test_lost_source_artifact_reruns_the_source_stage(tmp_path, monkeypatch):
    cfg = replace(qp.BenchConfig(), methods=("talora",), settings=("k16",), seeds=(0,))
    plan = qp.build_plan(cfg)
    for run in plan:
        qp.save_result(tmp_path, run.key, _fake_result(run, 0.5))
    executed = []
    monkeypatch.setattr(quality_runs, "execute", lambda run, cache, progress=True: executed.append(run.stage)
                        or _fake_result(run, 0.5))
    quality.execute_plan(plan, tmp_path, 0, False, lambda: None)
    assert executed == ["source"]


def test_budget_stops_before_a_run_that_does_not_fit(tmp_path, monkeypatch):
    plan = qp.build_plan(replace(qp.BenchConfig(), methods=("prompt_tuning",), settings=("k16",), seeds=(0,)))
    monkeypatch.setattr(quality_runs, "execute", lambda *a, **k: pytest.fail("a run started past the budget"))
    assert quality.execute_plan(plan, tmp_path, 0.01, False, lambda: None) == 0


def test_summary_rows_have_the_required_fields(tmp_path):
    cfg = replace(qp.BenchConfig(), settings=("k16",))
    plan = qp.build_plan(cfg)
    results = {}
    for run in plan:
        if run.stage != "target" or run.seed in (0, 1):
            results[run.key] = _fake_result(run, 0.5 if run.seed == 0 else 0.7)
    rows, zero_shot = qr.summary_rows(plan, results), qr.reference_rows(plan, results)
    assert [z["task"] for z in zero_shot] == [*cfg.target_tasks, *cfg.source_tasks]
    assert all(z["method"] == qp.REFERENCE and z["accuracy"] == 0.5 for z in zero_shot)
    assert rows
    for row in rows:
        assert all(field in row for field in qr.REQUIRED)
        assert row["method"] in qp.METHODS and row["setting"] in ("full", "k16", "k32")
        assert row["majority_rate"] == 0.25
    target = [r for r in rows if r["role"] == "target"]
    assert {r["method"] for r in target} == set(qp.METHODS)
    assert all(r["seeds"] == 2 and r["mean"] == pytest.approx(0.6) and r["std"] == pytest.approx(0.1414, abs=1e-4)
               for r in target)
    source = [r for r in rows if r["role"] == "source"]
    assert {r["task"] for r in source} == set(cfg.source_tasks) and all(r["seeds"] == 1 for r in source)
    doc = qr.write_summary(tmp_path / "quality.json", rows, "python benchmarks/quality.py", cfg.to_dict(),
                           len(plan), len(results), zero_shot)
    assert json.loads((tmp_path / "quality.json").read_text())["rows"] == doc["rows"]
    assert set(doc) >= {"machine", "command", "rows", "zero_shot"}
    assert qr.plot(tmp_path / "quality.png", rows, zero_shot).stat().st_size > 0
    table = qr.markdown_table(rows).splitlines()
    assert len(table) == len(rows) + 2 and "0.600 ± 0.141" in table[2]


def test_params_per_task_counts():
    cfg = qp.BenchConfig()
    talora, shared = quality_runs.params_per_task("talora", qp.method_spec(cfg, "talora"), SMOL, 4)
    assert talora == 8 * 4 + 30 * 9 and shared == 32 * 576 + 4 * 576
    prompt, _ = quality_runs.params_per_task("prompt_tuning", qp.method_spec(cfg, "prompt_tuning"), SMOL, 0)
    assert prompt == 16 * 576 and talora * 10 <= prompt
    full, _ = quality_runs.params_per_task("talora_full_rank", qp.method_spec(cfg, "talora_full_rank"), SMOL, 4)
    assert full == 8 * 576 + 30 * 9
    no_gate, _ = quality_runs.params_per_task("talora_no_gate", qp.method_spec(cfg, "talora_no_gate"), SMOL, 4)
    assert no_gate == 8 * 4


def test_plan_only_prints_every_run(tmp_path, capsys):
    quality.main(["--plan-only", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    plan = qp.build_plan(qp.BenchConfig())
    assert len(out) == len(plan) + 1 and out[-1].startswith(f"{len(plan)} runs, {len(plan)} to do")
    assert all(run.key in line for run, line in zip(plan, out))


def test_estimates_follow_measured_runs():
    plan = qp.build_plan(replace(qp.BenchConfig(), methods=("prompt_tuning",), settings=("k16",), seeds=(0,)))
    run = next(r for r in plan if r.stage == "target")
    before = qp.estimate_seconds(run, qp.measured_rates([]))
    slow = {**_fake_result(run, 0.5), "seconds_per_step": 100.0, "wall_s": 100.0 * run.spec["steps"] + 500.0}
    rates = qp.measured_rates([slow])
    assert rates[("peft_prompt", "target")] == 100.0
    assert rates["eval_example"] == pytest.approx((500.0 - qp.DEFAULT_RATES["startup"]) / run.spec["test_limit"])
    assert qp.estimate_seconds(run, rates) == pytest.approx(100.0 * run.spec["steps"] + 500.0) != before
