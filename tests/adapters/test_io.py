"""Adapter files round-trip, and every malformed or mismatched file is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from talora.adapters.bundle import export_bundle, export_task, model_from_bundle
from talora.adapters.io import AdapterFormatError, TaskMeta, decode_task, encode_task, load_bundle, load_task
from talora.adapters.scoring import ScoreRequest, score_labels
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
