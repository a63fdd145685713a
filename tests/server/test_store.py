"""Which adapters a server serves (fast tier, tiny model): the bundle's tasks, then the store's,
which add tasks and replace same-name ones; a server with nothing to serve is not ready."""

from __future__ import annotations

import logging
import shutil

import httpx
import pytest

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
    with caplog.at_level(logging.WARNING, logger="talora.server.facade"), \
            serve(empty, tiny_server_model) as srv:
        r = httpx.get(f"{srv.url}/ready")
        assert r.status_code == 503 and r.json() == {"ready": False, "tasks": 0}
        assert httpx.get(f"{srv.url}/health").status_code == 200
    assert any("no task adapter loaded" in rec.getMessage() for rec in caplog.records)


# ----- last known good (issue 34 part 4) ------------------------------------------------------------------------
TOKEN = {"authorization": "Bearer s3cret"}


def _upload(url: str, task: str, folder) -> httpx.Response:
    files = {"metadata": ("m.json", (folder / f"{task}.json").read_bytes()),
             "tensors": ("t.safetensors", (folder / f"{task}.safetensors").read_bytes())}
    return httpx.put(f"{url}/v1/adapters/{task}", headers=TOKEN, files=files, timeout=60)


def test_a_broken_store_file_after_a_restart_serves_the_last_known_good_copy(tiny_bundle, tiny_server_model, tmp_path,
                                                                              caplog):
    """A store version of a bundle task, served; the server dies; its tensors file is truncated. After the
    restart the task serves the version it served before (its kept copy), not the bundle's, and says so."""
    write_version(tiny_bundle, tiny_server_model, "spam", seed=51, version="store-v1", out=tmp_path)
    with serve(tiny_bundle, tiny_server_model, store=tmp_path) as srv:
        assert _tasks(srv.url)["spam"]["version"] == "store-v1"
        before = httpx.post(f"{srv.url}/v1/tasks/spam/predict", json={"text": "win money"}).json()
    blob = (tmp_path / "spam.safetensors").read_bytes()
    (tmp_path / "spam.safetensors").write_bytes(blob[: len(blob) // 2])
    with caplog.at_level(logging.WARNING, logger="talora.server.adapter_registry"), \
            serve(tiny_bundle, tiny_server_model, store=tmp_path) as srv:
        spam = _tasks(srv.url)["spam"]
        assert (spam["version"], spam["source"]) == ("store-v1", "last-known-good:spam")
        after = httpx.post(f"{srv.url}/v1/tasks/spam/predict", json={"text": "win money"}).json()
        assert after["scores"] == pytest.approx(before["scores"], abs=1e-5)
        assert httpx.get(f"{srv.url}/ready").status_code == 200
    warning = next(r.getMessage() for r in caplog.records if "last-known-good copy" in r.getMessage())
    assert "spam.safetensors" in warning and "store-v1" in warning  # names the refused file and the copy served


def test_an_upload_survives_a_restart_and_an_evicted_task_does_not_come_back(tiny_bundle, tiny_server_model,
                                                                             tmp_path):
    store, other = tmp_path / "store", tmp_path / "other"
    store.mkdir()
    write_version(tiny_bundle, tiny_server_model, "spam", seed=52, version="up1", out=other, name="uploaded")
    write_version(tiny_bundle, tiny_server_model, "spam", seed=53, version="gone1", out=other, name="gone")
    with serve(tiny_bundle, tiny_server_model, store=store, admin_token="s3cret") as srv:
        assert _upload(srv.url, "uploaded", other).status_code == 200
        assert _upload(srv.url, "gone", other).status_code == 200
        assert httpx.delete(f"{srv.url}/v1/adapters/gone", headers=TOKEN).status_code == 200
    with serve(tiny_bundle, tiny_server_model, store=store, admin_token="s3cret") as srv:
        tasks = _tasks(srv.url)
        assert tasks["uploaded"]["version"] == "up1" and "gone" not in tasks
        assert httpx.get(f"{srv.url}/ready").json() == {"ready": True, "tasks": 6}
    assert not list(store.glob("*.json"))  # kept under .talora/, out of the store's listing


def test_a_task_served_before_that_loads_from_nowhere_makes_ready_503(tiny_bundle, tiny_server_model, tmp_path):
    """Both the store file and the kept copy are bad: the task is missing, /ready answers 503 and names it,
    until it is deleted (or loaded again)."""
    write_version(tiny_bundle, tiny_server_model, "spam", seed=54, version="only1", out=tmp_path, name="only")
    with serve(tiny_bundle, tiny_server_model, store=tmp_path):
        pass
    for file in [tmp_path / "only.safetensors", *(tmp_path / ".talora" / "served" / "only").glob("*.safetensors")]:
        file.write_bytes(b"broken")
    with serve(tiny_bundle, tiny_server_model, store=tmp_path, admin_token="s3cret") as srv:
        r = httpx.get(f"{srv.url}/ready")
        assert r.status_code == 503 and r.json() == {"ready": False, "tasks": 5, "missing": ["only"]}
        assert httpx.post(f"{srv.url}/v1/tasks/only/predict", json={"text": "x"}).status_code == 404
        r = httpx.delete(f"{srv.url}/v1/adapters/only", headers=TOKEN)
        assert r.status_code == 404 and "last-known-good copy was removed" in r.json()["detail"]
        assert httpx.get(f"{srv.url}/ready").json() == {"ready": True, "tasks": 5}
