"""The engine without HTTP, on the tiny random model: scores equal ``score_labels``, greedy
generation equals the full path, slots, the KV pool, text streaming, the adapter registry's
refusals, settings and CLI."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch

from talora.adapters.formats.bundle import model_from_bundle
from talora.adapters.formats.io import AdapterFormatError
from talora.adapters.runtime.scoring import ScoreRequest, score_labels
from talora.server.adapter_registry import AdapterConflict, AdapterNotFound, AdapterRegistry
from talora.server.engine.generation import TextStream
from talora.server.engine.kvpool import KVPool
from talora.server.jobs import Failed, Finished, GenerationParams, Job
from talora.server.metrics import Metrics
from talora.server.settings import Settings
from tests.helpers import ROOT
from tests.server.support import GENERATE, Collector, build_bundle, write_version

TEXTS = {"sentiment": "I love it", "topic": "the match ended 2-1", "spam": "win money now", "intent": "how much?"}


def _job(engine, task, text, kind="score", params=None):
    adapter = engine.adapter(task)
    ids, _ = engine.encode(adapter, text)
    sink = Collector()
    return Job(kind, adapter, ids, sink, time.monotonic() + 120, params), sink


SERVED = pytest.mark.parametrize("served", [("engine", "tiny_bundle"), ("deep_engine", "deep_bundle"),
                                            ("rows_engine", "rows_bundle")],
                                 ids=["input-prompt", "deep-prompt", "task-basis-rows"])


@SERVED
def test_mixed_task_batch_scores_equal_score_labels(served, request, tiny_server_model):
    engine, tiny_bundle = (request.getfixturevalue(name) for name in served)
    pairs = [_job(engine, task, text) for task, text in TEXTS.items()]
    engine.submit([job for job, _ in pairs])
    got = [sink.wait().scores for _, sink in pairs]
    loaded = tiny_server_model
    model, _, _ = model_from_bundle(loaded.model, tiny_bundle, loaded.fingerprint, tasks=list(TEXTS))
    with torch.no_grad():
        prefix = model.shared_kv()
        slots = model.task_slots(prefix, list(TEXTS))
        requests = [ScoreRequest(job.prompt_ids, [list(v) for v in job.label_ids], i)
                    for i, (job, _) in enumerate(pairs)]
        expected = score_labels(model, prefix, slots, requests)
    for scores, ref in zip(got, expected):
        assert torch.allclose(torch.tensor(scores), ref, atol=1e-4, rtol=1e-5)
    assert len({tuple(round(s, 3) for s in scores) for scores in got}) == len(got)
    assert engine.metrics.slot_evictions._value.get() >= 1  # 4 tasks through 3 slots


@SERVED
def test_greedy_generation_equals_full_path(served, request, tiny_server_model):
    engine, tiny_bundle = (request.getfixturevalue(name) for name in served)
    steps = 5
    job, sink = _job(engine, GENERATE, "The capital of France is", "generate",
                     GenerationParams(max_new_tokens=steps, temperature=0))
    engine.submit([job])
    result = sink.wait()
    assert isinstance(result, Finished) and 1 <= result.completion_tokens <= steps
    loaded = tiny_server_model
    model, _, _ = model_from_bundle(loaded.model, tiny_bundle, loaded.fingerprint, tasks=[GENERATE])
    ids = list(job.prompt_ids)
    with torch.no_grad():
        for _ in range(result.completion_tokens):
            logits = model.forward_full(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), [GENERATE])
            ids.append(int(logits[0, -1].argmax()))
    expected = tiny_server_model.tokenizer.decode(ids[len(job.prompt_ids):], skip_special_tokens=True)
    assert result.text == expected and "".join(e.text for e in sink.events[:-1]) == expected


def test_cancelled_and_expired_jobs_are_dropped(engine):
    job, sink = _job(engine, "spam", "hello")
    job.deadline = time.monotonic() - 1
    engine.submit([job])
    failure = sink.wait()
    assert isinstance(failure, Failed) and failure.status == 504


def test_kv_pool_allocates_first_fit_and_merges():
    pool = KVPool(1, 10, 1, 2, torch.float32, "cpu")
    a, b, c = pool.allocate(4), pool.allocate(3), pool.allocate(3)
    assert (a, b, c) == (0, 4, 7) and pool.allocate(1) is None
    pool.release(b, 3)
    assert pool.allocate(4) is None and pool.largest_free() == 3
    pool.release(a, 4)
    pool.release(c, 3)
    assert pool.free_tokens == 10 and pool.largest_free() == 10


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_possible_stop_strings():
    stream = TextStream(CharTokenizer(), stop=("END",))
    out = [stream.push(ord(ch)) for ch in "abEN"]
    assert out == ["a", "b", "", ""]
    assert stream.push(ord("X")) == "ENX"
    out = [stream.push(ord(ch)) for ch in "yEND"]
    assert out == ["y", "", "", ""] and stream.stopped and stream.text == "abENXy"


def test_registry_refuses_bad_files_and_keeps_the_old_version(tiny_bundle, tiny_server_model, tmp_path):
    from talora.adapters.formats.io import load_bundle

    bundle, _ = load_bundle(tiny_bundle)
    registry = AdapterRegistry(bundle, tiny_bundle, tiny_server_model.tokenizer, Metrics())
    assert "sentiment" in registry.load_all()
    old = registry.get("sentiment")
    meta, blob = (tiny_bundle / "sentiment.json").read_bytes(), (tiny_bundle / "sentiment.safetensors").read_bytes()
    from safetensors.torch import save

    wrong_shape = save({"fast": torch.zeros(3, 4), "gate": old.gate})
    wrong_dtype = save({"fast": old.fast.double(), "gate": old.gate.double()})
    other_base = json.dumps({**json.loads(meta), "bundle_fingerprint": "0" * 64}).encode()
    cases = [(meta, wrong_shape, "fast: shape"), (meta, wrong_dtype, "dtype"), (meta, b"not a safetensors file",
             "not a safetensors file"), (other_base, blob, "bundle_fingerprint")]
    for meta_bytes, tensors, needle in cases:
        with pytest.raises(AdapterFormatError, match=needle):
            registry.load_bytes("sentiment", meta_bytes, tensors)
    with pytest.raises(AdapterFormatError, match="outside the adapter store"):
        registry.load_store("sentiment", "../elsewhere/sentiment")
    with pytest.raises(AdapterNotFound):
        registry.load_store("sentiment", "missing/sentiment")
    other = save({"fast": old.fast + 1, "gate": old.gate})  # a consistent pair under a version already loaded
    same_version = json.dumps({**json.loads(meta), "version": old.version,
                               "tensors_sha256": hashlib.sha256(other).hexdigest()}).encode()
    with pytest.raises(AdapterConflict, match="version"):
        registry.load_bytes("sentiment", same_version, other)
    assert registry.get("sentiment") is old
    assert registry.load_bytes("sentiment", meta, blob) == (old, False)


def test_registry_watch_picks_up_new_and_changed_files(tmp_path, tiny_server_model):
    folder = build_bundle(tmp_path / "b", tiny_server_model)
    from talora.adapters.formats.io import load_bundle

    bundle, _ = load_bundle(folder)
    registry = AdapterRegistry(bundle, folder, tiny_server_model.tokenizer, Metrics())
    registry.load_all()
    spam = registry.get("spam")
    assert registry.poll_store() == []
    write_version(folder, tiny_server_model, "topic", seed=9, version="v2")
    assert registry.poll_store() == []  # seen once: wait for the writer to finish
    assert registry.poll_store() == ["topic"] and registry.get("topic").version == "v2"
    (folder / "spam.safetensors").write_bytes(b"garbage")
    registry.poll_store()
    registry.poll_store()
    assert registry.get("spam") is spam  # the bad file is refused, the old version stays


def test_settings_from_flags_and_environment(monkeypatch, tmp_path):
    from talora.server.cli import build_parser, main

    monkeypatch.setenv("TALORA_NUM_SLOTS", "5")
    monkeypatch.setenv("TALORA_MAX_QUEUE", "7")
    args = vars(build_parser().parse_args(["--max-queue", "9", "--on-overflow", "reject", "--bundle", str(tmp_path)]))
    settings = Settings(**args)
    assert (settings.num_slots, settings.max_queue, settings.on_overflow) == (5, 9, "reject")
    assert main(["--num-slots", "0", "--bundle", str(tmp_path)]) == 2


def test_no_bundle_says_how_to_make_one(monkeypatch, tmp_path, capsys):
    from talora.server import cli, facade

    monkeypatch.setattr(facade, "demo_bundle_dir", lambda: tmp_path / "demo")
    assert cli.main([]) == 2
    assert "talora-train demo" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_is_documented(name):
    docs = (ROOT / "docs" / "serving.md").read_text()
    assert f"`--{name.replace('_', '-')}` | `TALORA_{name.upper()}`" in docs


def test_slot_placement_grows_one_key_at_a_time_as_can_place_says(engine):
    slots = engine.loaded.runner.slots
    resident = slots.resident()
    placement = slots.placement(set())
    keys: set = set()
    for key in [*resident, ("new-a", 1), ("new-b", 1), ("new-c", 1), ("new-d", 1)]:
        assert placement.add(key) == slots.can_place(keys | {key})
        if slots.can_place(keys | {key}):
            keys.add(key)
    assert placement.keys == keys
