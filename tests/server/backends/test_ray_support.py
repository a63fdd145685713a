"""The Ray-free parts of the Ray Serve application (routing keys, in-process ASGI, metrics, the shared store,
options and flags): fast, in the default suite, no Ray needed."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from talora.server.backends.ray.support import (
    RayOptions,
    admin_task,
    asgi_exchange,
    merge_metrics,
    rank_by_affinity,
    retry_delay,
    task_of,
)
from talora.server.metrics import Metrics
from talora.server.settings import Settings


@pytest.mark.parametrize("method, path, body, task", [
    ("POST", "/v1/tasks/sentiment/predict", b"", "sentiment"),
    ("POST", "/v1/tasks/echo/generate", b"", "echo"),
    ("GET", "/v1/tasks/echo", b"", "echo"),
    ("POST", "/v1/completions", b'{"model": "echo", "prompt": "x"}', "echo"),
    ("POST", "/v1/completions", b"not json", None),
    ("POST", "/v1/completions", b'{"model": 3}', None),
    ("GET", "/v1/tasks", b"", None),
    ("GET", "/health", b"", None),
    ("PUT", "/v1/adapters/sentiment", b"", None),
])
def test_task_of_finds_the_task_a_request_is_served_with(method, path, body, task):
    assert task_of(method, path, body) == task


def test_admin_task_only_for_put_and_delete():
    assert admin_task("PUT", "/v1/adapters/a") == "a"
    assert admin_task("DELETE", "/v1/adapters/a") == "a"
    assert admin_task("GET", "/v1/adapters/a") is None
    assert admin_task("PUT", "/v1/tasks/a/predict") is None


def _echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return {"got": body}

    @app.get("/stream")
    async def stream():
        async def parts():
            for i in range(3):
                yield f"part{i};"
        return StreamingResponse(parts(), media_type="text/plain", headers={"x-extra": "1"})

    return app


def _exchange(app, method, path, body=b"", headers=()):
    async def run():
        return [item async for item in asgi_exchange(app, method, path, b"", list(headers), body)]
    return asyncio.run(run())


def test_asgi_exchange_yields_the_head_then_the_body():
    head, *chunks = _exchange(_echo_app(), "POST", "/echo", b'{"a": 1}', [(b"content-type", b"application/json")])
    assert head["status"] == 200
    assert json.loads(b"".join(chunks)) == {"got": {"a": 1}}
    head, *chunks = _exchange(_echo_app(), "GET", "/stream")
    assert (b"x-extra", b"1") in head["headers"]
    assert b"".join(chunks) == b"part0;part1;part2;"


def test_asgi_exchange_keeps_the_apps_status_codes():
    head, *_ = _exchange(_echo_app(), "POST", "/echo", b"[]", [(b"content-type", b"application/json")])
    assert head["status"] == 422
    head, *_ = _exchange(_echo_app(), "GET", "/nowhere")
    assert head["status"] == 404


def test_merge_metrics_labels_every_sample_with_its_replica_and_parses_back():
    texts = {}
    for replica, hits in (("a", 3), ("b", 5)):
        metrics = Metrics()
        metrics.slot_hits.inc(hits)
        metrics.requests.labels("t", "/x", "200").inc()
        metrics.queue_seconds.observe(0.2)
        texts[replica] = metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(merge_metrics(texts))}
    hits = {s.labels["replica"]: s.value for s in families["talora_slot_hits"].samples if s.name.endswith("_total")}
    assert hits == {"a": 3.0, "b": 5.0}
    buckets = [s for s in families["talora_queue_seconds"].samples if s.name.endswith("_bucket")]
    assert {s.labels["replica"] for s in buckets} == {"a", "b"}
    assert families["talora_requests"].samples[0].labels["task"] == "t"


def test_ray_options_validate_and_build_deployment_options():
    fixed = RayOptions(replicas=3, max_ongoing_requests=32).replica_options()
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 32 and "autoscaling_config" not in fixed
    scaled = RayOptions(replicas=1, autoscale_max_replicas=4, target_ongoing_requests=8).replica_options()
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}
    assert "num_replicas" not in scaled
    with pytest.raises(ValidationError, match="autoscale_max_replicas"):
        RayOptions(replicas=3, autoscale_max_replicas=2)
    assert RayOptions().ingress_options()["num_replicas"] == 2  # no single ingress by default
    assert RayOptions(ingress_replicas=3).ingress_options()["num_replicas"] == 3
    with pytest.raises(ValidationError, match="ingress_replicas"):
        RayOptions(ingress_replicas=0)


def test_ray_flags_parse_into_settings_and_options(tmp_path):
    from talora.server.backends.ray.cli import main, parse

    settings, options = parse(["--replicas", "3", "--num-slots", "16", "--max-ongoing-requests", "128",
                               "--store", str(tmp_path), "--address", "auto"])
    assert isinstance(settings, Settings) and settings.num_slots == 16 and settings.store == tmp_path
    assert (options.replicas, options.max_ongoing_requests, options.address) == (3, 128, "auto")
    assert main(["--replicas", "0"]) == 2
    _, options = parse(["--ingress-replicas", "3", "--affinity-slack", "4", "--routing", "serve"])
    assert (options.ingress_replicas, options.affinity_slack, options.routing) == (3, 4, "serve")
    assert main(["--routing", "nearest"]) == 2


def test_ray_flag_refuses_what_it_cannot_serve(monkeypatch, capsys):
    import importlib.util

    from talora.server.cli import main

    real_find_spec = importlib.util.find_spec
    if real_find_spec("ray") is not None:
        assert main(["--ray", "--admin-token", "x"]) == 2  # the admin routes need a shared store folder
        assert "store" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "ray" else real_find_spec(name))
    assert main(["--ray", "--replicas", "2"]) == 2
    assert "pip install 'talora[ray]'" in capsys.readouterr().err


def test_affinity_keeps_a_task_on_its_holder_until_it_is_slack_requests_busier():
    import random

    rng = random.Random(0)
    # (replica, requests in flight, holds the task)
    assert rank_by_affinity([("a", 3, True), ("b", 0, False)], slack=8, rng=rng)[0] == "a"
    assert rank_by_affinity([("a", 8, True), ("b", 0, False)], slack=8, rng=rng)[0] == "a"  # a tie: the holder
    assert rank_by_affinity([("a", 9, True), ("b", 0, False)], slack=8, rng=rng)[0] == "b"  # spills over
    # two holders: the less busy one; a new replica (count unknown) fills once the others are busy
    assert rank_by_affinity([("a", 9, True), ("b", 4, True), ("c", None, False)], slack=8, rng=rng) == ["b", "c", "a"]
    assert rank_by_affinity([("a", 12, True), ("c", None, False)], slack=8, rng=rng)[0] == "c"
    # no holder yet (a new task): the least busy replica, ties at random
    firsts = {rank_by_affinity([("a", 2, False), ("b", 2, False)], slack=8, rng=rng)[0] for _ in range(20)}
    assert firsts == {"a", "b"}
    assert rank_by_affinity([("a", 1, True), ("b", 0, False)], slack=0, rng=rng)[0] == "b"


def test_retry_delay_is_the_clients_contract():
    assert retry_delay(None) == 1.0  # the connection failed
    assert retry_delay(503, {"retry-after": "3"}) == 3.0
    assert retry_delay(503, {}) == 1.0
    assert retry_delay(500, {}, b"Internal Server Error") == 1.0  # Serve's proxy: the ingress died
    assert retry_delay(500, {}, b'{"detail": "the replica failed: ValueError", "field": null}') is None
    assert retry_delay(200, {}, b"{}") is None and retry_delay(404, {}, b"{}") is None
