"""The shared store of the Ray Serve application: versions by file, persisting a loaded adapter, evicting.
Fast and Ray-free, in the default suite."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from talora.server.adapter_registry import AdapterRegistry
from talora.server.backends.ray.store import SharedStore
from talora.server.metrics import Metrics
from tests.server.support import write_version


@pytest.fixture()
def store(tmp_path, tiny_bundle):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    folder = tmp_path / "store"
    folder.mkdir()
    return SharedStore(folder, bundle)


def _registry(store: SharedStore, loaded) -> AdapterRegistry:
    from talora.adapters.formats.io import load_bundle

    meta, _ = load_bundle(store.bundle)
    return AdapterRegistry(meta, store.store, loaded.tokenizer, Metrics())


def test_version_of_reads_the_store_then_the_bundle(store):
    bundle_version = json.loads((store.bundle / "sentiment.json").read_text())["version"]
    assert store.version_of("sentiment") == bundle_version
    assert store.version_of("no_such_task") is None
    assert store.version_of("../escape") is None
    shutil.copy(store.bundle / "sentiment.safetensors", store.store)
    meta = json.loads((store.bundle / "sentiment.json").read_text())
    (store.store / "sentiment.json").write_text(json.dumps({**meta, "version": "v9"}))
    assert store.version_of("sentiment") == "v9"
    (store.store / "sentiment.json").write_text(json.dumps({**meta, "version": "v10"}))
    os.utime(store.store / "sentiment.json", ns=(1, 1))  # a new stat signature, whatever the clock
    assert store.version_of("sentiment") == "v10"


def test_persist_writes_the_loaded_version_and_evict_hides_the_task(store, tiny_server_model, tmp_path):
    write_version(store.bundle, tiny_server_model, "sentiment", seed=5, version="v2", out=tmp_path / "v2")
    registry = _registry(store, tiny_server_model)
    shutil.copy(tmp_path / "v2" / "sentiment.json", store.store / "incoming.json")  # a PUT with another path
    shutil.copy(tmp_path / "v2" / "sentiment.safetensors", store.store / "incoming.safetensors")
    adapter, _ = registry.load_store("sentiment", "incoming")
    assert store.persist(adapter) is True
    assert store.persist(adapter) is False  # the store already names it
    assert store.version_of("sentiment") == "v2"
    again, _ = _registry(store, tiny_server_model).load_store("sentiment")  # what another replica loads
    assert again.version == "v2" and again.fast.equal(adapter.fast) and again.gate.equal(adapter.gate)

    store.evict("sentiment")
    assert store.version_of("sentiment") is None  # not even the bundle's version comes back
    assert not (store.store / "sentiment.json").exists()
    assert len(list((store.store / ".evicted").glob("sentiment.*.json"))) == 1
    assert store.persist(adapter) is True  # a later PUT brings it back
    assert store.version_of("sentiment") == "v2"
