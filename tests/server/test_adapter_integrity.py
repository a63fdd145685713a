"""Adapter integrity over HTTP (issue 34; fast tier, tiny model, a real uvicorn on 127.0.0.1): metadata
that passed the old partial checks and broke serving is refused whole with 400 naming the field, and
nothing changes; a refusal never installs; store files are read with a size bound (413); the admin
routes turn a deep body into 400 and a full temporary folder into 507; ``previous_version`` is the
version the install itself replaced."""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
import threading
import time

import httpx
import pytest

from tests.server.support import CLASSIFY, GENERATE, build_bundle, serve, write_version

TOKEN = {"authorization": "Bearer s3cret"}
LABELS_3000 = {"labels": [f"l{i}" for i in range(3000)], "verbalizers": {f"l{i}": f" w{i}" for i in range(3000)}}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tiny_server_model):
    return build_bundle(tmp_path_factory.mktemp("integrity-bundle"), tiny_server_model)


@pytest.fixture(scope="module")
def server(bundle_dir, tiny_server_model):
    with serve(bundle_dir, tiny_server_model, admin_token="s3cret") as srv:
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _files(folder, task):
    return (folder / f"{task}.json").read_bytes(), (folder / f"{task}.safetensors").read_bytes()


def _upload(client, task, meta: bytes, tensors: bytes):
    return client.put(f"/v1/adapters/{task}", headers=TOKEN,
                      files={"metadata": ("m.json", meta), "tensors": ("t.safetensors", tensors)})


def _listings_answer(client) -> None:
    assert client.get("/v1/tasks").status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert client.get("/ready").status_code == 200


@pytest.mark.parametrize("change,field", [
    ({"version": 3}, "version"),  # used to answer 500, apply the swap, then 500 every listing
    ({"version": None}, "version"),
    ({"version": "v\u00e9"}, "version"),  # the version goes into the X-Talora-Adapter-Version header
    ({"version": "v2\r\nX-Evil: 1"}, "version"),
    ({"version": "v2\u0000"}, "version"),
    ({"max_input_tokens": 2.5}, "max_input_tokens"),
    ({"max_input_tokens": True}, "max_input_tokens"),
    ({"max_input_tokens": 10**9}, "max_input_tokens"),
    ({"training": "x"}, "training"),
    ({"training": {"deep": [[[[[[[[[[1]]]]]]]]]]}}, "training"),
    ({"template": "{text} {foo}"}, "template"),
    ({"template": "{text} {"}, "template"),
    ({"template": "{text} {0}"}, "template"),
    ({"template": "{text:>999999999}"}, "template"),
    ({"labels": ["positive", 2]}, "labels"),
    ({"verbalizers": {"positive": 1, "negative": " bad"}}, "verbalizers"),
    ({"verbalizers": {"positive": " good " * 20, "negative": " bad"}}, "verbalizers"),  # over 16 tokens
    (LABELS_3000, "labels"),
    ({"kind": "generate"}, "labels"),
])
def test_metadata_that_broke_serving_is_refused_whole(client, bundle_dir, change, field):
    before = client.get("/v1/tasks/sentiment").json()
    meta, blob = _files(bundle_dir, "sentiment")
    data = {**json.loads(meta), **change, "version": change.get("version", "v-bad")}
    r = _upload(client, "sentiment", json.dumps(data).encode(), blob)
    assert r.status_code == 400 and r.json()["detail"].startswith(field), r.text
    assert client.get("/v1/tasks/sentiment").json() == before  # nothing was installed
    _listings_answer(client)
    r = client.post("/v1/tasks/sentiment/predict", json={"text": "good"})
    assert r.status_code == 200 and r.headers["x-talora-adapter-version"] == before["version"]


def test_a_task_name_with_a_trailing_newline_is_refused(client, bundle_dir):
    meta, blob = _files(bundle_dir, "sentiment")
    data = {**json.loads(meta), "task": "evil\n", "version": "e1"}
    r = _upload(client, "evil%0A", json.dumps(data).encode(), blob)
    assert r.status_code == 400 and r.json()["detail"].startswith("task:"), r.text
    assert "evil\n" not in {t["task"] for t in client.get("/v1/tasks").json()["tasks"]}


def test_a_deeply_nested_body_is_a_400(client, bundle_dir):
    deep = b"[" * 100_000 + b"]" * 100_000
    r = client.put("/v1/adapters/sentiment", content=deep,
                   headers={**TOKEN, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"].startswith("body:"), r.text
    _, blob = _files(bundle_dir, "sentiment")
    r = _upload(client, "sentiment", deep, blob)
    assert r.status_code == 400 and r.json()["detail"].startswith("metadata:"), r.text
    _listings_answer(client)


def test_a_full_temporary_folder_during_an_upload_is_a_507(client, bundle_dir, monkeypatch):
    import starlette.formparsers

    class Full(tempfile.SpooledTemporaryFile):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", Full)
    meta, blob = _files(bundle_dir, "sentiment")
    r = _upload(client, "sentiment", meta, blob)
    assert r.status_code == 507 and "No space left on device" in r.json()["detail"], r.text
    monkeypatch.undo()
    _listings_answer(client)


def test_a_store_file_over_max_upload_bytes_is_a_413_before_it_is_read(tiny_server_model, tmp_path):
    folder = build_bundle(tmp_path / "b", tiny_server_model)
    store = tmp_path / "store"
    (store / "big").mkdir(parents=True)
    shutil.copy(folder / "spam.json", store / "big" / "spam.json")
    with open(store / "big" / "spam.safetensors", "wb") as handle:
        handle.truncate(100 * 2**20)  # sparse: 100 MB that take no disk; the old reader read them all
    with serve(folder, tiny_server_model, store=store, admin_token="s3cret", max_upload_bytes=2**20) as srv:
        r = httpx.put(f"{srv.url}/v1/adapters/spam", json={"path": "big/spam"}, headers=TOKEN, timeout=60)
        assert r.status_code == 413, r.text
        assert r.json()["detail"] == f"big/spam.safetensors: {100 * 2**20} bytes is over max_upload_bytes={2**20}"


def test_previous_version_is_what_the_install_replaced(tiny_server_model, tmp_path):
    """A PUT whose body arrives slowly while another PUT replaces the task answers the version it
    replaced (the other PUT's), not the one current when it started."""
    folder = build_bundle(tmp_path / "b", tiny_server_model)
    write_version(folder, tiny_server_model, "spam", seed=21, version="v2", out=tmp_path / "v2")
    write_version(folder, tiny_server_model, "spam", seed=22, version="v3", out=folder / "v3")
    meta, blob = _files(tmp_path / "v2", "spam")
    boundary = "talora-boundary"
    body = b"".join([
        f'--{boundary}\r\nContent-Disposition: form-data; name="metadata"; filename="m.json"\r\n\r\n'.encode(),
        meta, b"\r\n",
        f'--{boundary}\r\nContent-Disposition: form-data; name="tensors"; filename="t.safetensors"\r\n\r\n'.encode(),
        blob, f"\r\n--{boundary}--\r\n".encode()])
    sent_half = threading.Event()
    other_done = threading.Event()

    def slow():
        yield body[:20]
        sent_half.set()
        other_done.wait(30)
        yield body[20:]

    with serve(folder, tiny_server_model, admin_token="s3cret") as srv:
        v1 = httpx.get(f"{srv.url}/v1/tasks/spam").json()["version"]
        answers = {}

        def put_slow():
            answers["slow"] = httpx.put(f"{srv.url}/v1/adapters/spam", content=slow(), timeout=60, headers={
                **TOKEN, "content-type": f"multipart/form-data; boundary={boundary}",
                "content-length": str(len(body))})

        thread = threading.Thread(target=put_slow)
        thread.start()
        assert sent_half.wait(30)
        time.sleep(0.3)  # the slow PUT's route has started and waits for the rest of its body
        fast = httpx.put(f"{srv.url}/v1/adapters/spam", json={"path": "v3/spam"}, headers=TOKEN, timeout=60)
        other_done.set()
        thread.join(60)
        assert fast.status_code == 200 and fast.json()["previous_version"] == v1
        slow_answer = answers["slow"]
        assert slow_answer.status_code == 200, slow_answer.text
        assert (slow_answer.json()["version"], slow_answer.json()["previous_version"]) == ("v2", "v3")
        same = httpx.put(f"{srv.url}/v1/adapters/spam", json={"path": "v3/spam"}, headers=TOKEN, timeout=60).json()
        assert same["changed"] is True and same["previous_version"] == "v2"
        again = httpx.put(f"{srv.url}/v1/adapters/spam", json={"path": "v3/spam"}, headers=TOKEN, timeout=60).json()
        assert again["changed"] is False and again["previous_version"] == "v3"


def test_every_task_the_server_serves_has_a_clean_listing(client):
    """After all of the above, the module's server still lists its tasks (nothing bad was installed)."""
    tasks = {t["task"] for t in client.get("/v1/tasks").json()["tasks"]}
    assert tasks == {*CLASSIFY, GENERATE}
