"""Adapter files round-trip, and every malformed or mismatched file is refused by name."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save

from talora.adapters.formats.bundle import export_bundle, export_task, model_from_bundle
from talora.adapters.formats.io import (
    TASK_NAME,
    AdapterFormatError,
    TaskMeta,
    check_task_name,
    decode_task,
    encode_task,
    load_bundle,
    load_task,
)
from talora.adapters.runtime.scoring import ScoreRequest, score_labels
from tests.helpers import tiny_talora_model

TASK_FIELDS = dict(kind="classify", labels=["neg", "pos"], verbalizers={"neg": " bad", "pos": " good"},
                   template="Review: {text}\nSentiment:", max_input_tokens=64)


@pytest.fixture()
def saved(tiny_llama_dir, tmp_path):
    model, fingerprint = tiny_talora_model(tiny_llama_dir, ("sst", "news"), shared_prompt_len=4, task_prompt_len=3,
                                           rank=2)
    lm = model.lm
    bundle = export_bundle(model, tmp_path, "tiny", fingerprint)
    for task in ("sst", "news"):
        export_task(model, task, tmp_path, bundle, **TASK_FIELDS)
    return model, lm, fingerprint, bundle, tmp_path


def test_round_trip(saved):
    model, lm, fingerprint, bundle, folder = saved
    loaded, meta, tasks = model_from_bundle(lm, folder, fingerprint)
    assert meta.fingerprint == bundle.fingerprint and sorted(tasks) == ["news", "sst"]
    assert torch.equal(loaded.prompt, model.prompt) and torch.equal(loaded.basis, model.basis)
    for task in tasks:
        assert torch.equal(loaded.tasks[task].gate, model.tasks[task].gate)
        assert tasks[task].version and tasks[task].labels == ["neg", "pos"]


def test_a_task_with_basis_rows_of_its_own_round_trips_beside_one_without(saved):
    model, lm, fingerprint, bundle, folder = saved
    d = lm.config.hidden_size
    model.add_task("own", torch.randn(3, 4), basis=torch.randn(2, d))
    export_task(model, "own", folder, bundle, **TASK_FIELDS)
    loaded, _, tasks = model_from_bundle(lm, folder, fingerprint)
    assert sorted(tasks) == ["news", "own", "sst"] and loaded.tasks["sst"].basis is None
    assert torch.equal(loaded.tasks["own"].fast, model.tasks["own"].fast)
    assert torch.equal(loaded.tasks["own"].basis, model.tasks["own"].basis)


def test_other_base_model_is_refused(saved):
    *_, folder = saved
    with pytest.raises(AdapterFormatError, match="base_fingerprint"):
        load_bundle(folder, base_fingerprint="0" * 64)


def _task_bytes(folder, task="sst"):
    return (folder / f"{task}.json").read_bytes(), (folder / f"{task}.safetensors").read_bytes()


@pytest.mark.parametrize("tensors,match", [
    ({"fast": torch.zeros(3, 5), "gate": torch.zeros(2, 4)}, "fast: shape"),
    ({"fast": torch.zeros(3, 2), "gate": torch.zeros(3, 4)}, "gate: shape"),
    ({"fast": torch.zeros(3, 2, dtype=torch.float16), "gate": torch.zeros(2, 4)}, "fast: dtype"),
    ({"fast": torch.zeros(3, 2)}, "do not match the expected"),
    ({"fast": torch.full((3, 2), float("nan")), "gate": torch.zeros(2, 4)}, "NaN"),
    ({"fast": torch.zeros(3, 2), "gate": torch.zeros(2, 4), "basis": torch.zeros(1, 64)}, "fast: shape"),
    ({"fast": torch.zeros(3, 3), "gate": torch.zeros(2, 4), "basis": torch.zeros(1, 7)}, "basis: shape"),
    ({"fast": torch.zeros(3, 3), "gate": torch.zeros(2, 4), "basis": torch.zeros(32)}, "basis: shape"),
])
def test_bad_tensors_are_refused(saved, tensors, match):
    *_, bundle, folder = saved
    meta_bytes, _ = _task_bytes(folder)
    with pytest.raises(AdapterFormatError, match=match):
        decode_task(meta_bytes, save(tensors), bundle)


def test_not_safetensors_is_refused(saved):
    *_, bundle, folder = saved
    meta_bytes, _ = _task_bytes(folder)
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        decode_task(meta_bytes, b"\x80\x04pickle-bytes", bundle)


@pytest.mark.parametrize("change,match", [
    ({"bundle_fingerprint": "f" * 64}, "bundle_fingerprint"),
    ({"kind": "poem"}, "kind"),
    ({"task": "../etc/passwd"}, "task"),
    ({"labels": ["neg", "pos", "mid"]}, "verbalizers"),
    ({"template": "no field"}, "template"),
    ({"surprise": 1}, "unknown field"),
    ({"dtype": "bfloat16"}, "dtype"),
])
def test_bad_metadata_is_refused(saved, change, match):
    *_, bundle, folder = saved
    meta_bytes, blob = _task_bytes(folder)
    data = {**json.loads(meta_bytes), **change}
    with pytest.raises(AdapterFormatError, match=match):
        decode_task(json.dumps(data).encode(), blob, bundle)


def test_task_name_mismatch_and_missing_files(saved):
    *_, bundle, folder = saved
    meta_bytes, blob = _task_bytes(folder)
    with pytest.raises(AdapterFormatError, match="not 'news'"):
        decode_task(meta_bytes, blob, bundle, expected_task="news")
    with pytest.raises(AdapterFormatError, match="not found"):
        load_task(folder, "absent", bundle)


def test_version_tracks_content(saved):
    model, *_, bundle, folder = saved
    first = TaskMeta(task="sst", bundle_fingerprint=bundle.fingerprint, **TASK_FIELDS)
    encode_task(first, model.tasks["sst"].fast, model.tasks["sst"].gate)
    second = TaskMeta(task="sst", bundle_fingerprint=bundle.fingerprint, **TASK_FIELDS)
    encode_task(second, model.tasks["sst"].fast + 1, model.tasks["sst"].gate)
    assert first.version != second.version


def test_scores_match_full_path(saved):
    model, *_ = saved
    names = ["sst", "news"]
    labels = [[5, 9], [7], [11, 3, 2]]
    requests = [ScoreRequest([1, 2, 3, 4], labels, 0), ScoreRequest([8, 9], labels, 1)]
    with torch.no_grad():
        prefix = model.shared_kv()
        slots = model.task_kv(prefix, *model.stacked(names))
        scores = score_labels(model, prefix, slots, requests)
        for req, got in zip(requests, scores):
            for verb, score in zip(labels, got):
                ids = torch.tensor([req.prompt_ids + verb])
                logp = torch.log_softmax(model.forward_full(ids, torch.ones_like(ids, dtype=torch.bool),
                                                            [names[req.slot]]), -1)[0]
                start = len(req.prompt_ids) - 1
                want = sum(logp[start + j, tok] for j, tok in enumerate(verb))
                assert abs(score.item() - want.item()) < 1e-4


# ----- issue 34: one strict schema for a task's metadata, and a JSON bound to its tensors -------------------------
LABELS_3000 = {"labels": [f"l{i}" for i in range(3000)], "verbalizers": {f"l{i}": f" w{i}" for i in range(3000)}}


@pytest.mark.parametrize("change,field", [
    ({"version": 3}, "version"),
    ({"version": None}, "version"),
    ({"version": ""}, "version"),
    ({"version": "v\u00e9"}, "version"),  # non-ASCII: it goes into a response header
    ({"version": "v1\r\nX-Evil: 1"}, "version"),
    ({"version": "v1\u0000"}, "version"),
    ({"version": "v 1"}, "version"),
    ({"version": "v" * 65}, "version"),
    ({"max_input_tokens": 2.5}, "max_input_tokens"),
    ({"max_input_tokens": True}, "max_input_tokens"),
    ({"max_input_tokens": "64"}, "max_input_tokens"),
    ({"max_input_tokens": 0}, "max_input_tokens"),
    ({"max_input_tokens": -5}, "max_input_tokens"),
    ({"max_input_tokens": 10**9}, "max_input_tokens"),
    ({"format_version": True}, "format_version"),
    ({"training": "x"}, "training"),
    ({"training": {"a": [[[[[[[[[1]]]]]]]]]}}, "training"),
    ({"training": {"blob": "x" * 70000}}, "training"),
    ({"template": "{text} {foo}"}, "template"),
    ({"template": "{text} {"}, "template"),
    ({"template": "{text} }"}, "template"),
    ({"template": "{text} {0}"}, "template"),
    ({"template": "{text} {}"}, "template"),
    ({"template": "{text.__class__}"}, "template"),
    ({"template": "{text:>99999999}"}, "template"),
    ({"template": "{text!r}"}, "template"),
    ({"template": "{{text}}"}, "template"),
    ({"template": 5}, "template"),
    ({"task": "sst\n"}, "task"),
    ({"task": 7}, "task"),
    ({"labels": "neg,pos"}, "labels"),
    ({"labels": [1, 2], "verbalizers": {"1": " a", "2": " b"}}, "labels"),
    ({"labels": ["neg", "neg"]}, "labels"),
    ({"labels": ["neg", ""], "verbalizers": {"neg": " bad", "": " x"}}, "labels"),
    ({"labels": ["pos"], "verbalizers": {"pos": " good"}}, "labels"),
    (LABELS_3000, "labels"),
    ({"verbalizers": {"neg": 1, "pos": " good"}}, "verbalizers"),
    ({"verbalizers": {"neg": " bad", "pos": " good", "mid": " meh"}}, "verbalizers"),
    ({"verbalizers": {"neg": " bad", "pos": " bad"}}, "verbalizers"),
    ({"verbalizers": ["neg", "pos"]}, "verbalizers"),
    ({"kind": "generate"}, "labels"),  # a generate task has no labels
    ({"kind": "extract", "labels": [], "verbalizers": {"neg": " bad"}}, "verbalizers"),
    ({"kind": 1}, "kind"),
    ({"bundle_fingerprint": 5}, "bundle_fingerprint"),
    ({"tensors_sha256": "xyz"}, "tensors_sha256"),
    ({"tensors_sha256": "0" * 64}, "tensors_sha256"),  # well-formed, but not these tensors
])
def test_metadata_has_one_strict_schema_and_errors_name_the_field(saved, change, field):
    *_, bundle, folder = saved
    meta_bytes, blob = _task_bytes(folder)
    data = {**json.loads(meta_bytes), **change}
    with pytest.raises(AdapterFormatError) as info:
        decode_task(json.dumps(data).encode(), blob, bundle)
    assert str(info.value).startswith(f"{field}"), str(info.value)


@pytest.mark.parametrize("raw,needle", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"task": "sst", "version": "a", "version": "b"}', "appears twice"),
    (b'{"training": {"loss": NaN}}', "NaN"),
    (b'\xff\xfe{}', "not UTF-8"),
    (b'{"task": "sst", "labels": ["\\ud800", "x"]}', "lone surrogate"),
    (b" " * (2**20 + 1), "over the limit"),
])
def test_metadata_that_is_not_plain_json_is_refused(saved, raw, needle):
    *_, bundle, folder = saved
    _, blob = _task_bytes(folder)
    data = json.loads(_task_bytes(folder)[0])
    if raw.startswith(b'{"task": "sst", "labels"'):  # a whole document but for one lone surrogate label
        data["labels"] = ["\ud800", "x"]
        data["verbalizers"] = {"\ud800": " a", "x": " b"}
        raw = json.dumps(data).encode()
    with pytest.raises(AdapterFormatError, match=needle):
        decode_task(raw, blob, bundle)


def test_save_binds_the_json_to_its_tensors(saved):
    model, *_, bundle, folder = saved
    sst_meta, sst_blob = _task_bytes(folder, "sst")
    assert json.loads(sst_meta)["tensors_sha256"] == hashlib.sha256(sst_blob).hexdigest()
    # version s2 of sst: its JSON beside s1's tensors (a half-copied store) is refused, and the other way round
    meta2 = TaskMeta(task="sst", bundle_fingerprint=bundle.fingerprint, version="s2", **TASK_FIELDS)
    meta2_bytes, blob2 = encode_task(meta2, model.tasks["sst"].fast + 1, model.tasks["sst"].gate)
    for meta_bytes, blob in ((meta2_bytes, sst_blob), (sst_meta, blob2)):
        with pytest.raises(AdapterFormatError, match="^tensors_sha256: .* the pair is from two versions"):
            decode_task(meta_bytes, blob, bundle)
    assert decode_task(meta2_bytes, blob2, bundle)[0].version == "s2"


def test_files_without_the_digest_stay_readable_unless_it_is_required(saved):
    *_, bundle, folder = saved
    meta_bytes, blob = _task_bytes(folder)
    old = json.loads(meta_bytes)
    del old["tensors_sha256"]
    old_bytes = json.dumps(old).encode()
    assert decode_task(old_bytes, blob, bundle)[0].tensors_sha256 == ""
    with pytest.raises(AdapterFormatError, match="^tensors_sha256: missing"):
        decode_task(old_bytes, blob, bundle, require_digest=True)


def test_written_files_always_pass_the_schema(saved):
    model, *_, bundle, _ = saved
    meta = TaskMeta(task="sst", bundle_fingerprint=bundle.fingerprint,
                    training={"final_loss": float("nan"), "steps": (1, 2)}, **TASK_FIELDS)
    meta_bytes, blob = encode_task(meta, model.tasks["sst"].fast, model.tasks["sst"].gate)
    got = decode_task(meta_bytes, blob, bundle)[0]
    assert got.training == {"final_loss": None, "steps": [1, 2]}  # a diverged run's NaN is written as null
    meta.version = "bad version"
    with pytest.raises(AdapterFormatError, match="^version"):
        encode_task(meta, model.tasks["sst"].fast, model.tasks["sst"].gate)
    with pytest.raises(AdapterFormatError, match="^labels"):
        TaskMeta(task="sst", bundle_fingerprint=bundle.fingerprint, **{**TASK_FIELDS, **LABELS_3000})


def test_task_names_end_at_the_end():
    assert TASK_NAME.fullmatch("evil\n") is None and TASK_NAME.match("evil\n") is None
    with pytest.raises(AdapterFormatError, match="^task"):
        check_task_name("evil\n")


def test_the_packaged_demo_bundle_still_reads():
    from talora.adapters.demo import demo_bundle_dir
    from talora.adapters.formats.io import list_task_names

    folder = demo_bundle_dir()
    if not (folder / "talora.json").is_file():
        pytest.skip("the demo bundle is not built")
    bundle, _ = load_bundle(folder)
    for task in list_task_names(folder):
        assert load_task(folder, task, bundle)[0].version


def test_eval_of_a_task_the_registry_does_not_know_is_a_usage_error(tiny_bundle, tiny_server_model, capsys):
    """``talora-train eval --task X`` on a bundle task with no registry data (a task of one's own, without
    --task-files): one error line and a hint, status 2, not a traceback."""
    from talora.adapters.train.cli import main

    code = main(["eval", "--model", tiny_server_model.name, "--bundle", str(tiny_bundle), "--task", "sentiment",
                 "--device", "cpu", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("talora-train: error: unknown task 'sentiment'"), err
    assert "--task-files" in err and "Traceback" not in err
