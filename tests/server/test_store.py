"""Which adapters a server serves (fast tier, tiny model): the bundle's tasks, then the store's,
which add tasks and replace same-name ones; a server with nothing to serve is not ready."""

from __future__ import annotations

import logging
import shutil

import httpx

from tests.server.support import CLASSIFY, GENERATE, serve, write_version


def _tasks(url: str) -> dict[str, dict]:
    return {t["task"]: t for t in httpx.get(f"{url}/v1/tasks").json()["tasks"]}


def test_store_adds_tasks_and_replaces_same_name_ones(tiny_bundle, tiny_server_model, tmp_path):
    write_version(tiny_bundle, tiny_server_model, "spam", seed=5, version="store-v2", out=tmp_path)
    write_version(tiny_bundle, tiny_server_model, "spam", seed=6, version="extra-v1", out=tmp_path, name="extra")
    with serve(tiny_bundle, tiny_server_model, store=tmp_path) as srv:
        tasks = _tasks(srv.url)
        assert set(tasks) == {*CLASSIFY, GENERATE, "extra"}
        assert (tasks["spam"]["version"], tasks["spam"]["source"]) == ("store-v2", "store:spam")
        assert tasks["extra"]["source"] == "store:extra" and tasks["topic"]["source"] == "bundle:topic"
        r = httpx.post(f"{srv.url}/v1/tasks/spam/predict", json={"text": "hi"})
        assert r.status_code == 200 and r.json()["version"] == "store-v2"
        assert httpx.get(f"{srv.url}/ready").json() == {"ready": True, "tasks": 6}


def test_an_empty_store_keeps_the_bundle_tasks(tiny_bundle, tiny_server_model, tmp_path):
    with serve(tiny_bundle, tiny_server_model, store=tmp_path) as srv:
        assert set(_tasks(srv.url)) == {*CLASSIFY, GENERATE}


def test_a_bad_store_file_leaves_the_bundle_version_serving(tiny_bundle, tiny_server_model, tmp_path):
    (tmp_path / "topic.json").write_text("{not json")
    (tmp_path / "topic.safetensors").write_bytes(b"nope")
    with serve(tiny_bundle, tiny_server_model, store=tmp_path) as srv:
        assert _tasks(srv.url)["topic"]["source"] == "bundle:topic"


def test_nothing_to_serve_is_not_ready(tiny_bundle, tiny_server_model, tmp_path, caplog):
    empty = tmp_path / "bundle"
    empty.mkdir()
    for name in ("talora.json", "shared.safetensors"):
        shutil.copy(tiny_bundle / name, empty / name)
    with caplog.at_level(logging.WARNING, logger="talora.server.engine"), \
            serve(empty, tiny_server_model) as srv:
        r = httpx.get(f"{srv.url}/ready")
        assert r.status_code == 503 and r.json() == {"ready": False, "tasks": 0}
        assert httpx.get(f"{srv.url}/health").status_code == 200
    assert any("no task adapter loaded" in rec.getMessage() for rec in caplog.records)
