"""Hot swap over HTTP: replacing an adapter under load, refusing bad files, evicting, watching the store."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from safetensors.torch import save

from talora.adapters.formats.bundle import model_from_bundle
from talora.adapters.formats.io import load_task
from talora.adapters.runtime.scoring import ScoreRequest, score_labels
from tests.server.support import GENERATE, build_bundle, serve, write_version

TOKEN = {"authorization": "Bearer s3cret"}
TEXTS = ["good", "bad", "fine", "awful"]
LOAD = 200


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, tier_model):
    folder = build_bundle(tmp_path_factory.mktemp("bundle"), tier_model)
    write_version(folder, tier_model, "sentiment", seed=11, version="v2", out=folder / "v2")
    write_version(folder, tier_model, GENERATE, seed=12, version="g2", out=folder / "v2")
    return folder


@pytest.fixture(scope="module")
def server(bundle_dir, tier_model):
    with serve(bundle_dir, tier_model, admin_token="s3cret", max_batch_size=64) as srv:
        yield srv


def _expected(bundle_dir, loaded, engine) -> dict[str, dict[str, list[float]]]:
    """Label scores of each text under each version, computed on the reference path."""
    model, bundle, metas = model_from_bundle(loaded.model, bundle_dir, loaded.fingerprint, tasks=["sentiment"])
    meta2, tensors = load_task(bundle_dir / "v2", "sentiment", bundle)
    adapter = model.add_task("v2", tensors["fast"])
    with torch.no_grad():
        adapter.gate.copy_(tensors["gate"])
        prefix = model.shared_kv()
        slots = model.task_kv(prefix, *model.stacked(["sentiment", "v2"]))
        current = engine.adapter("sentiment")
        requests = [ScoreRequest(engine.encode(current, text)[0], [list(v) for v in current.label_ids], slot)
                    for slot in (0, 1) for text in TEXTS]
        scores = [s.tolist() for s in score_labels(model, prefix, slots, requests)]
    versions = (metas["sentiment"].version, meta2.version)
    return {v: dict(zip(TEXTS, scores[i * len(TEXTS):(i + 1) * len(TEXTS)])) for i, v in enumerate(versions)}


def test_replace_under_load_fails_nothing_and_versions_match_results(server, bundle_dir, tier_model):
    expected = _expected(bundle_dir, tier_model, server.engine)
    v1, v2 = expected
    assert max(abs(a - b) for t in TEXTS for a, b in zip(expected[v1][t], expected[v2][t])) > 0.1

    async def run():
        done, swapped_at = [], None
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            async def one(i):
                sent = time.monotonic()
                r = await client.post("/v1/tasks/sentiment/predict", json={"text": TEXTS[i % len(TEXTS)]})
                done.append((i, sent, r))

            async def swap():
                nonlocal swapped_at
                while len(done) < LOAD // 4:
                    await asyncio.sleep(0.02)
                r = await client.put("/v1/adapters/sentiment", json={"path": "v2/sentiment"}, headers=TOKEN)
                swapped_at = time.monotonic()
                return r

            sem = asyncio.Semaphore(48)

            async def limited(i):
                async with sem:
                    await one(i)

            swap_task = asyncio.create_task(swap())
            await asyncio.gather(*(limited(i) for i in range(LOAD)))
            return done, await swap_task, swapped_at

    done, swap, swapped_at = asyncio.run(run())
    assert swap.status_code == 200 and swap.json()["version"] == v2 and swap.json()["previous_version"] == v1
    assert len(done) == LOAD and all(r.status_code == 200 for _, _, r in done)
    seen = {v1: 0, v2: 0}
    for i, sent, r in done:
        body = r.json()
        seen[body["version"]] += 1
        want = expected[body["version"]][TEXTS[i % len(TEXTS)]]
        assert all(abs(a - b) < 1e-3 for a, b in zip(body["scores"].values(), want)), (body, want)
        if sent > swapped_at:
            assert body["version"] == v2
    assert seen[v1] >= LOAD // 4 and seen[v2] >= 1


def test_generation_in_flight_keeps_its_version(server, bundle_dir):
    body = {"text": "Once upon a time", "max_new_tokens": 16, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        old = client.post(f"/v1/tasks/{GENERATE}/generate", json=body).json()
        with client.stream("POST", f"/v1/tasks/{GENERATE}/generate", json={**body, "stream": True}) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            swap = client.put(f"/v1/adapters/{GENERATE}", json={"path": f"v2/{GENERATE}"}, headers=TOKEN)
            events = [json.loads(first[6:])] + [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
        new = client.post(f"/v1/tasks/{GENERATE}/generate", json=body).json()
    assert swap.status_code == 200 and swap.json()["version"] == "g2"
    assert events[-1]["version"] == old["version"] and events[-1]["text"] == old["text"]
    assert new["version"] == "g2" and new["text"] != old["text"]


def _upload(client, task, meta: bytes, tensors: bytes):
    return client.put(f"/v1/adapters/{task}", headers=TOKEN,
                      files={"metadata": ("m.json", meta), "tensors": ("t.safetensors", tensors)})


def test_invalid_adapters_are_refused_and_the_old_version_serves(server, bundle_dir, tier_model, tmp_path):
    meta = (bundle_dir / "spam.json").read_bytes()
    good = server.engine.adapter("spam")
    other = build_bundle(tmp_path / "other", tier_model, seed=7)  # another bundle fingerprint
    (bundle_dir / "link").symlink_to(tmp_path)
    cases = {
        "fast: shape": (meta, save({"fast": torch.zeros(2, 4), "gate": good.gate})),
        "fast: dtype": (meta, save({"fast": good.fast.to(torch.bfloat16), "gate": good.gate})),
        "not a safetensors file": (meta, b"\x00" * 64),
        "bundle_fingerprint": ((other / "spam.json").read_bytes(), (other / "spam.safetensors").read_bytes()),
    }
    with httpx.Client(base_url=server.url, timeout=60) as client:
        before = client.post("/v1/tasks/spam/predict", json={"text": "win money"}).json()
        for needle, (m, t) in cases.items():
            r = _upload(client, "spam", m, t)
            assert r.status_code == 400 and needle in r.json()["detail"], (needle, r.text)
        for path in ("../spam", "/etc/passwd", "link/other/spam"):
            r = client.put("/v1/adapters/spam", json={"path": path}, headers=TOKEN)
            assert r.status_code == 400 and "adapter store" in r.json()["detail"], (path, r.text)
        r = client.put("/v1/adapters/spam", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        after = client.post("/v1/tasks/spam/predict", json={"text": "win money"}).json()
    assert after["version"] == before["version"] == good.version
    assert after["scores"] == pytest.approx(before["scores"], abs=1e-4)


def test_evict_and_load_back(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.delete("/v1/adapters/topic", headers=TOKEN).status_code == 200
        assert client.post("/v1/tasks/topic/predict", json={"text": "goal"}).status_code == 404
        assert client.delete("/v1/adapters/topic", headers=TOKEN).status_code == 404
        r = client.put("/v1/adapters/topic", headers=TOKEN)
        assert r.status_code == 200 and r.json()["previous_version"] is None
        assert client.post("/v1/tasks/topic/predict", json={"text": "goal"}).status_code == 200


def test_watcher_picks_up_new_and_changed_adapters(tmp_path, tier_model):
    folder = build_bundle(tmp_path / "b", tier_model)
    with serve(folder, tier_model, watch_interval_s=0.2) as srv, httpx.Client(base_url=srv.url) as client:
        write_version(folder, tier_model, "spam", seed=3, version="w2")
        write_version(folder, tier_model, "spam", seed=4, version="new1", name="spam2")

        def versions():
            return {t["task"]: t["version"] for t in client.get("/v1/tasks").json()["tasks"]}

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (versions().get("spam") == "w2" and "spam2" in versions()):
            time.sleep(0.1)
        assert versions()["spam"] == "w2" and versions()["spam2"] == "new1"
        r = client.post("/v1/tasks/spam2/predict", json={"text": "free money"}, timeout=60)
        assert r.status_code == 200 and r.json()["version"] == "new1"


def _wait_for(condition, timeout=30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_watcher_never_serves_a_half_copied_pair_in_either_order(tmp_path, tiny_server_model):
    """`cp x.*` or rsync copy a task's JSON before its tensors: the watcher refuses the mixed pair (the old
    version keeps serving, with its own scores), and loads the new version once both files agree; the
    same with the tensors first. An admin PUT in between is a 400, not a later 409."""
    import shutil

    folder = build_bundle(tmp_path / "b", tiny_server_model)
    for seed, version in ((31, "s2"), (32, "s3")):
        write_version(folder, tiny_server_model, "spam", seed=seed, version=version, out=tmp_path / version)
    with serve(folder, tiny_server_model, watch_interval_s=0.1, admin_token="s3cret") as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client:
        def version():
            return client.get("/v1/tasks/spam").json()["version"]

        s1 = version()
        s1_answer = client.post("/v1/tasks/spam/predict", json={"text": "free money"}).json()
        for new, first, second in (("s2", ".json", ".safetensors"), ("s3", ".safetensors", ".json")):
            old = version()
            old_answer = client.post("/v1/tasks/spam/predict", json={"text": "free money"}).json()
            shutil.copy(tmp_path / new / f"spam{first}", folder / f"spam{first}")
            time.sleep(1.0)  # ten polls: the half pair has been stable long enough to be read
            assert version() == old
            answer = client.post("/v1/tasks/spam/predict", json={"text": "free money"}).json()
            assert answer["version"] == old and answer["scores"] == pytest.approx(old_answer["scores"], abs=1e-5)
            r = client.put("/v1/adapters/spam", headers=TOKEN)
            assert r.status_code == 400 and r.json()["detail"].startswith("tensors_sha256:"), r.text
            shutil.copy(tmp_path / new / f"spam{second}", folder / f"spam{second}")
            assert _wait_for(lambda: version() == new), version()  # noqa: B023 - used at once
            answer = client.post("/v1/tasks/spam/predict", json={"text": "free money"}).json()
            assert answer["version"] == new and answer["scores"] != pytest.approx(old_answer["scores"], abs=1e-5)
        assert s1 != "s3" and s1_answer["version"] == s1


def test_watcher_loads_only_files_that_name_their_tensors(tmp_path, tiny_server_model):
    """A JSON without tensors_sha256 (written before it existed) cannot be checked against its tensors:
    the watcher leaves it (and says why), an explicit PUT loads it."""
    folder = build_bundle(tmp_path / "b", tiny_server_model)
    write_version(folder, tiny_server_model, "spam", seed=41, version="old-format", out=tmp_path / "o")
    meta = json.loads((tmp_path / "o" / "spam.json").read_text())
    del meta["tensors_sha256"]
    with serve(folder, tiny_server_model, watch_interval_s=0.1, admin_token="s3cret") as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client:
        before = client.get("/v1/tasks/spam").json()["version"]
        (folder / "spam.safetensors").write_bytes((tmp_path / "o" / "spam.safetensors").read_bytes())
        (folder / "spam.json").write_text(json.dumps(meta))
        time.sleep(1.0)
        assert client.get("/v1/tasks/spam").json()["version"] == before
        r = client.put("/v1/adapters/spam", headers=TOKEN)
        assert r.status_code == 200 and r.json()["version"] == "old-format", r.text
