"""End to end over HTTP: a real uvicorn on 127.0.0.1, on the tiny random model (fast tier) and on the
real default model (``-m slow``).

Concurrent requests of several tasks equal the same requests one at a time; generation as JSON,
as server-sent events and through the official openai client; every bad input gets its status.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.server.support import CLASSIFY, GENERATE, serve

TEXTS = {"sentiment": ["I love this phone", "terrible battery"], "topic": ["the match ended 2-1", "new vaccine trial"],
         "spam": ["win a free cruise now", "see you at lunch"], "intent": ["how much is it?", "add two to my cart"]}


@pytest.fixture(scope="module")
def server(tier_bundle, tier_model):
    with serve(tier_bundle, tier_model) as srv:
        yield srv


def _calls():
    calls = [(f"/v1/tasks/{task}/predict", {"text": text}) for task, texts in TEXTS.items() for text in texts]
    calls.append(("/v1/tasks/topic/predict", {"text": ["a goal in the final minute", "the senate voted"]}))
    for prompt in ("The capital of France is", "Once upon a time"):
        calls.append((f"/v1/tasks/{GENERATE}/generate", {"text": prompt, "max_new_tokens": 6, "temperature": 0}))
    return calls


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "scores":
            assert a[key].keys() == b[key].keys()
            assert all(abs(a[key][k] - b[key][k]) < 1e-3 for k in a[key])
        elif key == "probabilities":
            assert all(abs(a[key][k] - b[key][k]) < 1e-4 for k in a[key])
        elif key == "results":
            for x, y in zip(a[key], b[key], strict=True):
                _same(x, y)
        else:
            assert a[key] == b[key], key


def test_concurrent_requests_across_tasks_equal_sequential(server):
    calls = _calls()
    with httpx.Client(base_url=server.url, timeout=120) as client:
        sequential = [client.post(path, json=body) for path, body in calls]
    assert all(r.status_code == 200 for r in sequential), [r.text for r in sequential]

    async def concurrent():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in calls))

    together = asyncio.run(concurrent())
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    for one, many in zip(sequential, together):
        _same(one.json(), many.json())
        assert one.headers["x-talora-adapter-version"] == one.json()["version"]
    labels = {r.json()["label"] for r in sequential[:8]}
    assert len(labels) >= 4  # the tasks answer with their own labels
    registry = server.engine.metrics.registry
    assert registry.get_sample_value("talora_batch_tasks_sum") > registry.get_sample_value("talora_batch_tasks_count")


def test_generate_json_stream_and_openai_client_agree(server):
    import openai

    body = {"text": "The capital of France is", "max_new_tokens": 6, "temperature": 0}
    with httpx.Client(base_url=server.url, timeout=120) as client:
        plain = client.post(f"/v1/tasks/{GENERATE}/generate", json=body).json()
        with client.stream("POST", f"/v1/tasks/{GENERATE}/generate", json={**body, "stream": True}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1]["type"] == "done" and events[-1]["text"] == plain["text"]
    assert "".join(e["text"] for e in events[:-1]) == plain["text"]
    assert plain["completion_tokens"] >= 1 and plain["finish_reason"] in ("stop", "length")

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model=GENERATE, prompt=body["text"], max_tokens=6, temperature=0)
    assert done.choices[0].text == plain["text"] and done.system_fingerprint == plain["version"]
    assert done.usage.completion_tokens == plain["completion_tokens"]
    chunks = list(client.completions.create(model=GENERATE, prompt=body["text"], max_tokens=6, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain["text"]
    assert chunks[-1].choices[0].finish_reason == plain["finish_reason"]
    assert {m.id for m in client.models.list()} == {*CLASSIFY, GENERATE}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-task", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=GENERATE, prompt="x", max_tokens=2, n=2)


def test_stop_string_ends_generation(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        full = client.post(f"/v1/tasks/{GENERATE}/generate",
                           json={"text": "1, 2, 3, 4,", "max_new_tokens": 8, "temperature": 0}).json()
        stop = full["text"][2:4] if len(full["text"]) >= 4 else full["text"][-1]
        cut = client.post(f"/v1/tasks/{GENERATE}/generate",
                          json={"text": "1, 2, 3, 4,", "max_new_tokens": 8, "temperature": 0, "stop": stop}).json()
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][: full["text"].find(stop)]


def test_tasks_listing_names_versions_and_metadata(server, tier_bundle):
    tasks = httpx.get(f"{server.url}/v1/tasks").json()["tasks"]
    by_name = {t["task"]: t for t in tasks}
    assert set(by_name) == {*CLASSIFY, GENERATE}
    for name, labels in CLASSIFY.items():
        meta = json.loads((tier_bundle / f"{name}.json").read_text())
        assert by_name[name]["version"] == meta["version"] and by_name[name]["labels"] == list(labels)
    assert sum(t["resident"] for t in tasks) <= 3
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").json() == {"ready": True, "tasks": 5}


def test_bad_inputs_get_their_status(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/tasks/nope/predict", json={"text": "x"})
        assert r.status_code == 404 and "nope" in r.json()["detail"]
        r = c.post("/v1/tasks/spam/predict", json={"txt": "x"})
        assert r.status_code == 422 and r.json()["detail"].startswith("text:")
        r = c.post("/v1/tasks/spam/predict", json={"text": 5})
        assert r.status_code == 422 and "text" in r.json()["detail"]
        r = c.post("/v1/tasks/spam/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = c.post("/v1/tasks/spam/predict", json={"text": ["x"] * 65})
        assert r.status_code == 422 and r.json()["detail"].startswith("text:")
        r = c.post(f"/v1/tasks/{GENERATE}/generate", json={"text": "x", "max_new_tokens": 10_000})
        assert r.status_code == 422 and "max_new_tokens" in r.json()["detail"]
        r = c.post(f"/v1/tasks/{GENERATE}/generate", json={"text": "x", "temperature": -1})
        assert r.status_code == 422 and "temperature" in r.json()["detail"]
        r = c.post(f"/v1/tasks/{GENERATE}/predict", json={"text": "x"})
        assert r.status_code == 400 and "generate" in r.json()["detail"]
        r = c.put("/v1/adapters/spam", headers={"authorization": "Bearer x"})
        assert r.status_code == 403 and "TALORA_ADMIN_TOKEN" in r.json()["detail"]
        r = c.post("/v1/tasks/spam/predict", json={"text": "word " * 200})
        assert r.status_code == 200 and r.json()["truncated"] is True  # on_overflow=truncate (default)


def test_failing_batch_fails_only_its_own_requests(server, monkeypatch):
    engine = server.engine
    good_texts = ("hello", "win money")

    def ids(text: str) -> set[int]:
        return set(engine.encode(engine.adapter("spam"), text)[0])

    poison = min(ids("POISON") - set().union(*map(ids, good_texts)))  # a token only the poisoned prompt has
    runner = engine.loaded.runner
    real_forward = runner._forward

    def forward(plan, *args):
        if any(poison in row.tokens for row in plan.rows):
            raise RuntimeError("injected device failure")
        return real_forward(plan, *args)

    monkeypatch.setattr(runner, "_forward", forward)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        bad = c.post("/v1/tasks/spam/predict", json={"text": "POISON"})
        good = [c.post("/v1/tasks/spam/predict", json={"text": t}) for t in good_texts]
    assert bad.status_code == 500 and "injected device failure" in bad.json()["detail"]
    assert [r.status_code for r in good] == [200, 200]
    assert engine.alive()


def test_limits_overflow_queue_and_timeout(tier_bundle, tier_model, monkeypatch):
    with serve(tier_bundle, tier_model, on_overflow="reject", max_queue=2, max_batch_size=1,
               request_timeout_s=4) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        runner = srv.engine.loaded.runner
        real_forward = runner._forward

        def slow_forward(plan, *args):  # 400 steps outlast the 4 s timeout on any model
            time.sleep(0.02)
            return real_forward(plan, *args)

        monkeypatch.setattr(runner, "_forward", slow_forward)
        r = c.post("/v1/tasks/spam/predict", json={"text": "word " * 200})
        assert r.status_code == 413 and "limit of 32" in r.json()["detail"]

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                long = asyncio.create_task(ac.post(f"/v1/tasks/{GENERATE}/generate",
                                                   json={"text": "Count:", "max_new_tokens": 400, "temperature": 0}))
                await asyncio.sleep(0.5)  # the generation is running and holds the only batch row
                shorts = await asyncio.gather(*(ac.post("/v1/tasks/spam/predict", json={"text": f"hi {i}"})
                                                for i in range(6)))
                return await long, shorts

        long, shorts = asyncio.run(burst())
        codes = sorted(r.status_code for r in shorts)
        assert codes.count(429) >= 4, codes
        assert all(r.headers["retry-after"] == "1" for r in shorts if r.status_code == 429)
        assert long.status_code == 504 and "timed out" in long.json()["detail"]
