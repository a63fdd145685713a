"""The Ray Serve application on a local Ray cluster bound to 127.0.0.1, two CPU replicas (``-m ray``).

The tiny model carries the logic tests (answers equal the in-process server's, task affinity, hot
swap under load, a replica killed under load); the real default model repeats the equality test.
Each module run starts one local cluster (about a minute on two cores with the model loads).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import httpx
import pytest

from tests.server.support import CLASSIFY, GENERATE, build_bundle, free_port, serve, write_version

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
from ray import serve as ray_serve  # noqa: E402

from talora.server.backends.ray.cli import start_cluster  # noqa: E402
from talora.server.backends.ray.serve import build_app  # noqa: E402
from talora.server.backends.ray.support import RayOptions  # noqa: E402
from talora.server.settings import Settings  # noqa: E402
from tests.helpers import save_tiny_server_model  # noqa: E402

pytestmark = pytest.mark.ray
TOKEN = {"authorization": "Bearer s3cret"}
TEXTS = ["good", "bad", "fine", "awful"]
APP = "talora"


@pytest.fixture(scope="module")
def cluster():
    start_cluster(RayOptions(num_cpus=2), log_to_driver=False)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    port = free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    ray_serve.shutdown()
    ray.shutdown()


def test_the_cluster_and_serve_listen_on_the_loopback_interface_only(tiny_app):
    import os

    psutil = pytest.importorskip("psutil")
    processes = [psutil.Process(os.getpid()), *psutil.Process(os.getpid()).children(recursive=True)]
    pids = {p.pid for p in processes}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len({c.pid for c in listening}) >= 4  # the GCS, the raylet, Serve's proxy, the replicas...
    assert {c.laddr.ip for c in listening} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, listening


def deploy(settings: Settings, replicas: int = 2) -> None:
    ray_serve.run(build_app(settings, RayOptions(replicas=replicas, replica_cpus=1)), name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_server_model):
    """(model folder, store folder with a v2 of sentiment under v2/) of the tiny model."""
    root = tmp_path_factory.mktemp("ray-tiny")
    model_dir = save_tiny_server_model(root / "model")
    store = build_bundle(root / "store", tiny_server_model)
    write_version(store, tiny_server_model, "sentiment", seed=11, version="v2", out=store / "v2")
    write_version(store, tiny_server_model, "sentiment", seed=12, version="v3", out=root / "upload")
    return model_dir, store


@pytest.fixture(scope="module")
def tiny_app(cluster, tiny):
    model_dir, store = tiny
    settings = Settings(model=str(model_dir), bundle=store, num_slots=4, admin_token="s3cret", torch_threads=1,
                        drain_timeout_s=5)
    deploy(settings)
    yield cluster
    ray_serve.delete(APP)


def requests_of(task_kind: str) -> list[tuple[str, dict]]:
    if task_kind == "classify":
        return [(f"/v1/tasks/{task}/predict", {"text": TEXTS}) for task in CLASSIFY]
    return [(f"/v1/tasks/{GENERATE}/generate", {"text": "hello", "max_new_tokens": 6, "temperature": 0}),
            (f"/v1/tasks/{GENERATE}/generate", {"text": "hey", "max_new_tokens": 6, "temperature": 0, "stream": True}),
            ("/v1/completions", {"model": GENERATE, "prompt": "hi", "max_tokens": 5, "temperature": 0})]


def answers(url: str, calls: list[tuple[str, dict]]) -> list[dict]:
    with httpx.Client(base_url=url, timeout=120) as client:
        out = []
        for path, body in calls:
            r = client.post(path, json=body)
            assert r.status_code == 200, r.text
            if body.get("stream"):  # server-sent events: the last one is "done", with the whole text
                events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
                assert [e["type"] for e in events[:-1]] == ["token"] * (len(events) - 1)
                out.append(events[-1])
            else:
                out.append(r.json())
        return out


def assert_same_answers(ray_answers: list[dict], local_answers: list[dict]) -> None:
    for got, want in zip(ray_answers, local_answers):
        if "results" in want:
            for g, w in zip(got["results"], want["results"]):
                assert g["label"] == w["label"]
                assert g["scores"] == pytest.approx(w["scores"], abs=1e-4)
        elif "choices" in want:
            assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
        else:
            assert got["text"] == want["text"]


def test_answers_equal_the_in_process_server(tiny_app, tiny, tiny_server_model):
    calls = requests_of("classify") + requests_of("generate")
    got = answers(tiny_app, calls)
    with serve(tiny[1], tiny_server_model, num_slots=4) as local:
        want = answers(local.url, calls)
    assert_same_answers(got, want)


def replica_of(client: httpx.Client, task: str) -> str:
    r = client.post(f"/v1/tasks/{task}/predict", json={"text": "good"})
    assert r.status_code == 200, r.text
    return r.headers["x-talora-replica"]


def test_a_task_keeps_landing_on_the_replica_that_holds_it(tiny_app):
    with httpx.Client(base_url=tiny_app, timeout=60) as client:
        for task in CLASSIFY:  # warm-up: each task's id reaches a replica, which reports it to the routers
            replica_of(client, task)
        time.sleep(2)
        seen = {task: {replica_of(client, task) for _ in range(8)} for task in CLASSIFY}
    assert all(len(replicas) == 1 for replicas in seen.values()), seen


def test_metrics_merge_every_replica(tiny_app):
    from prometheus_client.parser import text_string_to_metric_families

    from talora.server.backends.ray.serve import METRICS_PUSH_S

    with httpx.Client(base_url=tiny_app, timeout=60) as client:
        served = {replica_of(client, task) for task in CLASSIFY for _ in range(2)}
        time.sleep(METRICS_PUSH_S + 1)
        text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = [s for s in families["talora_requests"].samples if s.name == "talora_requests_total"]
    assert {s.labels["replica"] for s in requests} >= served
    assert sum(s.value for s in requests if s.labels["endpoint"] == "/v1/tasks/{task}/predict") >= 2 * len(CLASSIFY)


async def _load(url: str, calls: list[tuple[str, dict]], concurrency: int, retries: int = 0, during=None):
    """Send ``calls`` with ``concurrency`` in flight; ``during`` runs alongside. Returns (responses, retried)."""
    sem, done, retried = asyncio.Semaphore(concurrency), [], [0]
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(i: int, path: str, body: dict):
            async with sem:
                for attempt in range(retries + 1):
                    sent = time.monotonic()
                    try:
                        r = await client.post(path, json=body)
                    except httpx.TransportError:
                        r = None
                    if r is not None and r.status_code < 500:
                        break
                    retried[0] += 1
                    await asyncio.sleep(0.5 * (attempt + 1))
                done.append((i, sent, r))

        jobs = [one(i, path, body) for i, (path, body) in enumerate(calls)]
        extra = [during(client, done)] if during else []
        results = await asyncio.gather(*jobs, *extra)
    return sorted(done, key=lambda d: d[0]), (results[-1] if during else None), retried[0]


def test_hot_swap_under_load_fails_nothing(tiny_app, tiny):
    calls = [("/v1/tasks/sentiment/predict", {"text": TEXTS[i % 4]}) for i in range(160)]

    async def swap(client, done):
        while len(done) < 40:
            await asyncio.sleep(0.02)
        r = await client.put("/v1/adapters/sentiment", json={"path": "v2/sentiment"}, headers=TOKEN)
        return r, time.monotonic()

    done, (put, swapped_at), _ = asyncio.run(_load(tiny_app, calls, concurrency=16, during=swap))
    assert put.status_code == 200 and put.json()["version"] == "v2", put.text
    assert json.loads((tiny[1] / "sentiment.json").read_text())["version"] == "v2"  # the shared store has it
    assert [r.status_code for _, _, r in done] == [200] * len(calls)
    versions = {r.json()["version"] for _, _, r in done}
    assert "v2" in versions and len(versions) == 2
    assert all(r.json()["version"] == "v2" for _, sent, r in done if sent > swapped_at)
    by_version: dict[tuple[str, str], list[list[float]]] = {}
    for i, _, r in done:
        by_version.setdefault((r.json()["version"], TEXTS[i % 4]), []).append(list(r.json()["scores"].values()))
    for scores in by_version.values():  # a version's answer does not depend on where or when it ran
        assert all(s == pytest.approx(scores[0], abs=1e-4) for s in scores)


def listings_by_replica(client: httpx.Client, deadline_s: float = 60) -> dict[str, dict[str, str]]:
    """Each replica's task -> version, from ``GET /v1/tasks`` until both replicas have answered."""
    seen: dict[str, dict[str, str]] = {}
    deadline = time.monotonic() + deadline_s
    while len(seen) < 2 and time.monotonic() < deadline:
        r = client.get("/v1/tasks")
        seen[r.headers["x-talora-replica"]] = {t["task"]: t["version"] for t in r.json()["tasks"]}
    return seen


def test_an_upload_and_an_evict_reach_the_store_and_every_replica(tiny_app, tiny):
    store = tiny[1]
    upload = store.parent / "upload"
    kept = {suffix: (store / f"spam{suffix}").read_bytes() for suffix in (".json", ".safetensors")}
    with httpx.Client(base_url=tiny_app, timeout=60) as client:
        files = {"metadata": ("sentiment.json", (upload / "sentiment.json").read_bytes()),
                 "tensors": ("sentiment.safetensors", (upload / "sentiment.safetensors").read_bytes())}
        r = client.put("/v1/adapters/sentiment", files=files, headers=TOKEN)
        assert r.status_code == 200 and r.json()["version"] == "v3", r.text
        assert json.loads((store / "sentiment.json").read_text())["version"] == "v3"
        assert client.post("/v1/tasks/sentiment/predict", json={"text": "ok"}).json()["version"] == "v3"
        r = client.delete("/v1/adapters/spam", headers=TOKEN)
        assert r.status_code == 200, r.text
        assert [client.post("/v1/tasks/spam/predict", json={"text": "ok"}).status_code for _ in range(4)] == [404] * 4
        listings = listings_by_replica(client)
        assert len(listings) == 2
        assert all(v["sentiment"] == "v3" and "spam" not in v for v in listings.values()), listings
        for suffix, data in kept.items():  # spam comes back through the store, for the tests after this one
            (store / f"spam{suffix}").write_bytes(data)
        assert client.put("/v1/adapters/spam", headers=TOKEN).status_code == 200
        assert client.post("/v1/tasks/spam/predict", json={"text": "ok"}).status_code == 200


def replica_actors(deployment: str = "TaloraReplica") -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"#{deployment}#" in a["name"]]


def running_replicas(deployment: str = "TaloraReplica") -> int:
    states: dict = ray_serve.status().applications[APP].deployments[deployment].replica_states  # str enum keys
    return states.get("RUNNING", 0)


def kill_process_of(deployment: str) -> str:
    """``kill -9`` the worker process of one replica of ``deployment``; returns its replica id."""
    from talora.server.backends.ray.faults import kill_replica

    return kill_replica(APP, deployment)


class Load:
    """Closed loop: ``concurrency`` clients send ``calls`` round robin until ``stop()`` says so.

    A client retries what docs/scale_out.md says to retry (``retry_delay``: 503 with Retry-After, Serve's
    bare 500 for a dead ingress, a failed connection), at most ``tries`` times. ``answers`` holds
    (finished at, status, replica) of every final answer; ``retried`` counts the retries by status.
    """

    def __init__(self, url: str, calls: list[tuple[str, dict]], concurrency: int, tries: int = 6):
        self.url, self.calls, self.concurrency, self.tries = url, calls, concurrency, tries
        self.answers: list[tuple[float, int | None, str | None]] = []
        self.retried: dict[str, int] = {}
        self.sent = 0

    async def run(self, stop, during=None):
        from talora.server.backends.ray.support import retry_delay

        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            async def loop():
                while not stop(self):
                    path, body = self.calls[self.sent % len(self.calls)]
                    self.sent += 1
                    for _ in range(self.tries):
                        try:
                            r = await client.post(path, json=body)
                            status, delay = r.status_code, retry_delay(r.status_code, r.headers, r.content)
                        except httpx.TransportError:
                            r, status, delay = None, None, retry_delay(None)
                        if delay is None:
                            break
                        self.retried[str(status)] = self.retried.get(str(status), 0) + 1
                        await asyncio.sleep(delay)
                    replica = r.headers.get("x-talora-replica") if r is not None else None
                    self.answers.append((time.monotonic(), status, replica))

            jobs = [loop() for _ in range(self.concurrency)] + ([during(self)] if during else [])
            return await asyncio.gather(*jobs)

    def failed(self) -> list[tuple[float, int | None, str | None]]:
        return [a for a in self.answers if a[1] != 200]

    def longest_gap_after(self, t0: float) -> float:
        times = [t0] + sorted(t for t, status, _ in self.answers if t > t0 and status == 200)
        return max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else float("inf")


def watch(condition, interval_s: float = 0.25):
    """Poll ``condition()`` in a thread; ``seen["at"]`` is when it first held. Returns (seen, stop)."""
    import threading

    seen: dict = {}
    done = threading.Event()

    def poll():
        while not done.is_set() and "at" not in seen:
            try:
                if condition():
                    seen["at"] = time.monotonic()
            except Exception:  # noqa: BLE001 - the controller may be busy: poll again
                pass
            done.wait(interval_s)

    threading.Thread(target=poll, daemon=True).start()
    return seen, done.set


def test_killing_a_replica_loses_no_retried_request_and_the_new_one_takes_traffic(tiny_app, tiny):
    """kill -9 of an engine replica under load: no request fails (the ingress retries the ones it held), and
    the replacement answers within seconds of being up (task-affine routing with overflow fills it)."""
    calls = requests_of("classify")
    state: dict = {}
    first_new: dict = {}

    def stop(load: Load) -> bool:
        if "killed_at" not in state:
            return False
        new = [t for t, status, replica in load.answers if replica not in state["before"] and status == 200]
        if new and "at" not in first_new:
            first_new["at"] = new[0]
        fresh = [a for a in load.answers if a[0] > first_new.get("at", float("inf")) + 3]
        return len(fresh) >= 30 or time.monotonic() > state["killed_at"] + 150

    async def kill(load: Load):
        while len(load.answers) < 20:
            await asyncio.sleep(0.02)
        state["before"] = {r for _, _, r in load.answers}
        assert len(state["before"]) == 2, state
        names = set(replica_actors())
        state["victim"] = await asyncio.to_thread(kill_process_of, "TaloraReplica")
        state["killed_at"] = time.monotonic()
        state["running"], state["stop_watch"] = watch(  # the replacement is named and Serve reports it RUNNING
            lambda: bool(set(replica_actors()) - names) and running_replicas() == 2)

    load = Load(tiny_app, calls, concurrency=12)
    asyncio.run(load.run(stop, during=kill))
    state["stop_watch"]()
    assert load.failed() == [], load.failed()
    assert "at" in first_new, f"the new replica took no request in 150 s: {load.answers[-5:]}"
    running_at = state["running"].get("at", first_new["at"])
    after = [replica for t, _, replica in load.answers if t > first_new["at"] + 3]
    share = sum(replica not in state["before"] for replica in after) / len(after)
    print(f"replica kill: retried {load.retried}, new replica up {running_at - state['killed_at']:.1f} s after "
          f"the kill, first answer {first_new['at'] - running_at:.1f} s after it was up, share after {share:.2f}")
    assert first_new["at"] - running_at < 10, (first_new, running_at)
    assert share > 0.15, share
    with httpx.Client(base_url=tiny_app, timeout=60) as client:
        listings = listings_by_replica(client)
    # every replica, the new one too, serves the version the store names (v3 after the upload test)
    stored = json.loads((tiny[1] / "sentiment.json").read_text())["version"]
    assert [v["sentiment"] for v in listings.values()] == [stored] * 2, listings


def test_a_hot_task_spreads_over_both_replicas(tiny_app):
    calls = [("/v1/tasks/sentiment/predict", {"text": TEXTS * 4})]
    load = Load(tiny_app, calls, concurrency=24)
    asyncio.run(load.run(lambda load: load.sent >= 240))
    shares: dict[str | None, int] = {}
    for _, _, replica in load.answers[40:]:  # after the task's id reached a replica
        shares[replica] = shares.get(replica, 0) + 1
    print(f"one hot task, 24 in flight: requests by replica {shares}")
    assert load.failed() == [] and len(shares) == 2, shares
    assert min(shares.values()) > 0.15 * sum(shares.values()), shares


def test_killing_an_ingress_fails_no_request_even_without_client_retries(tiny_app):
    """kill -9 of one of the two ingress replicas under load, clients that never retry: the requests the dead
    ingress held are sent again by talora's middleware in Serve's proxy (``ray/proxy.py``), so none fails
    and none sees Serve's bare 500; the other ingress keeps answering; Serve replaces the dead one."""
    calls = requests_of("classify")
    state: dict = {}

    def stop(load: Load) -> bool:
        return "killed_at" in state and (len(load.answers) >= state["done_at_kill"] + 150
                                         or time.monotonic() > state["killed_at"] + 120)

    async def kill(load: Load):
        while len(load.answers) < 20:
            await asyncio.sleep(0.02)
        assert running_replicas("TaloraIngress") == 2
        state["victim"] = await asyncio.to_thread(kill_process_of, "TaloraIngress")
        state["killed_at"], state["done_at_kill"] = time.monotonic(), len(load.answers)

    load = Load(tiny_app, calls, concurrency=12, tries=1)
    asyncio.run(load.run(stop, during=kill))
    gap = load.longest_gap_after(state["killed_at"])
    print(f"ingress kill: {len(load.answers)} answers, {len(load.failed())} failed, longest gap without an "
          f"answer after the kill {gap:.2f} s")
    assert load.failed() == [], load.failed()
    assert len(load.answers) >= state["done_at_kill"] + 150
    assert gap < 5, gap
    deadline = time.monotonic() + 120
    while running_replicas("TaloraIngress") < 2 or state["victim"] in " ".join(replica_actors("TaloraIngress")):
        assert time.monotonic() < deadline, "Serve did not replace the killed ingress"
        time.sleep(1)


def test_the_ingress_bounds_request_bodies_as_one_machine_does(tiny_app):
    """A body over ``max_body_bytes`` is refused by the ingress with a JSON 413 naming the field, declared
    (Content-Length) or streamed (chunked), before the ingress holds it; the server answers on."""
    too_big = 4 * 2**20 + 1
    with httpx.Client(base_url=tiny_app, timeout=60) as client:
        declared = client.post("/v1/completions", content=b"x" * too_big, headers={"content-type": "application/json"})

        def chunks():
            for _ in range(5):
                yield b"x" * 2**20
        streamed = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        after = client.get("/v1/tasks")
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.json()["field"] == "body" and "max_body_bytes" in response.json()["detail"]
    assert after.status_code == 200


@pytest.fixture(scope="module")
def real_app(cluster, tmp_path_factory):
    from talora.adapters.demo import demo_bundle_dir

    if ray_serve.status().applications.get(APP) is not None:
        ray_serve.delete(APP)  # two CPUs: the tiny replicas make room
    store = tmp_path_factory.mktemp("ray-demo") / "store"
    shutil.copytree(demo_bundle_dir(), store, ignore=shutil.ignore_patterns("__*", "*.py", "*.md"))
    deploy(Settings(bundle=store, num_slots=8, torch_threads=1, drain_timeout_s=5))
    yield cluster, store
    ray_serve.delete(APP)


def test_real_model_answers_equal_the_in_process_server(real_app, default_model):
    url, store = real_app
    with httpx.Client(base_url=url, timeout=120) as client:
        tasks = [t for t in client.get("/v1/tasks").json()["tasks"] if t["kind"] == "classify"]
    assert len(tasks) >= 2
    calls = [(f"/v1/tasks/{t['task']}/predict", {"text": ["I loved it", "the match ended late"]}) for t in tasks]
    got = answers(url, calls)
    with serve(store, default_model, num_slots=8) as local:
        want = answers(local.url, calls)
    assert_same_answers(got, want)
