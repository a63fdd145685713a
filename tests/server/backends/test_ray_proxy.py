"""The middleware talora loads into Ray Serve's HTTP proxy (``talora.server.backends.ray.proxy``).

Fast and without Ray: the proxy's own app is stood in for by an ASGI app that, like Serve's
proxy when the ingress replica holding a request dies, returns without answering; the middleware
is driven through httpx's ASGI transport as the proxy's web server would drive it.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from talora.server.backends.ray.proxy import (
    CALLBACK,
    CALLBACK_ENV,
    ProxyLimits,
    ReplayWhenUpstreamDies,
    middlewares,
    replayable,
)


class Upstream:
    """Serve's proxy stand-in: the first ``dies`` calls read the body and return without answering
    (the ingress died); later ones echo the body with 200. Records the bodies it read."""

    def __init__(self, dies: int, started_then_dies: bool = False):
        self.dies, self.started_then_dies = dies, started_then_dies
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        if self.started_then_dies:  # a stream of tokens, cut
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type",
                                                                                    b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("the ingress died mid-stream")
        if len(self.bodies) <= self.dies:
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"echo:" + body})


def call(app, method: str, path: str, content: bytes = b"", **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            return await client.request(method, path, content=content, **kw)
    return asyncio.run(go())


def test_an_inference_request_whose_ingress_died_is_sent_again_with_its_body():
    upstream = Upstream(dies=2)
    app = ReplayWhenUpstreamDies(upstream, ProxyLimits(attempts=3))
    body = json.dumps({"text": "great film"}).encode()
    response = call(app, "POST", "/v1/tasks/sentiment/predict", body)
    assert response.status_code == 200 and response.content == b"echo:" + body
    assert upstream.bodies == [body, body, body]


def test_still_unanswered_after_its_attempts_is_a_json_503_with_retry_after_never_a_bare_500():
    upstream = Upstream(dies=10)
    response = call(ReplayWhenUpstreamDies(upstream, ProxyLimits(attempts=2)), "POST", "/v1/completions", b"{}")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json() == {"detail": "the ingress replica serving this request stopped; retry", "field": None}
    assert len(upstream.bodies) == 2


@pytest.mark.parametrize("method,path", [("PUT", "/v1/adapters/sentiment"), ("POST", "/v1/training/jobs"),
                                         ("DELETE", "/v1/adapters/sentiment")])
def test_a_request_that_changes_state_is_never_sent_twice(method, path):
    upstream = Upstream(dies=1)
    response = call(ReplayWhenUpstreamDies(upstream, ProxyLimits(attempts=3)), method, path, b"x" * 10)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "may or may not have been carried out" in response.json()["detail"]
    assert len(upstream.bodies) == 1


def test_a_body_over_the_replay_bound_streams_through_once_and_is_not_kept():
    upstream = Upstream(dies=1)
    big = b"y" * 5000
    response = call(ReplayWhenUpstreamDies(upstream, ProxyLimits(replay_bytes=1000, attempts=3)), "POST",
                    "/v1/completions", big)
    assert response.status_code == 503 and upstream.bodies == [big]  # read whole by the upstream, once


def test_a_stream_that_reached_the_client_passes_through_as_it_came():
    upstream = Upstream(dies=0, started_then_dies=True)
    with pytest.raises(RuntimeError, match="mid-stream"):  # the server closes the connection: a cut stream
        call(ReplayWhenUpstreamDies(upstream, ProxyLimits(attempts=3)), "POST", "/v1/completions", b"{}")
    assert len(upstream.bodies) == 1


def test_a_stalled_body_gets_a_json_408():
    async def stalled_client():
        messages = [{"type": "http.request", "body": b"{", "more_body": True}]
        sent = []

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)
        upstream = Upstream(dies=0)
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        await ReplayWhenUpstreamDies(upstream, ProxyLimits(body_timeout_s=0.05))(scope, receive, send)
        return sent, upstream

    sent, upstream = asyncio.run(stalled_client())
    assert sent[0]["status"] == 408 and b"body_timeout_s" in sent[1]["body"] and upstream.bodies == []


def test_replayable_routes_are_the_ones_that_change_nothing():
    assert replayable("GET", "/v1/tasks") and replayable("POST", "/v1/tasks/a/generate")
    assert replayable("POST", "/v1/completions") and not replayable("POST", "/v1/tasks/a/train")
    assert not replayable("PUT", "/v1/adapters/a") and not replayable("POST", "/v1/training/jobs/j/cancel")


def test_the_callback_reads_the_limits_the_cli_exported(monkeypatch):
    limits = ProxyLimits(replay_bytes=12345, attempts=5, body_timeout_s=2.5)
    for key, value in limits.env().items():
        monkeypatch.setenv(key, value)
    assert limits.env()[CALLBACK_ENV] == CALLBACK and ProxyLimits.from_env() == limits
    (middleware,) = middlewares()
    assert middleware.cls is ReplayWhenUpstreamDies and middleware.kwargs == {"limits": limits}


class DiesAfterItsStatusLine(Upstream):
    """The ingress sent its status line, then died before the body: the first ``dies`` calls."""

    async def __call__(self, scope, receive, send):
        body = (await receive()).get("body", b"")
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        if len(self.bodies) <= self.dies:
            return  # the proxy's generator ended: no body
        await send({"type": "http.response.body", "body": b"echo:" + body})


def test_an_answer_cut_before_its_body_reached_the_client_is_replaced_by_the_next_attempt():
    upstream = DiesAfterItsStatusLine(dies=1)
    response = call(ReplayWhenUpstreamDies(upstream, ProxyLimits(attempts=3)), "POST", "/v1/completions", b"{}")
    assert response.status_code == 200 and response.content == b"echo:{}" and len(upstream.bodies) == 2


def test_an_event_stream_goes_to_the_client_at_once():
    sent = []

    async def stream(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        assert [m["type"] for m in sent] == ["http.response.start"]  # not held back
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def go():
        messages = [{"type": "http.request", "body": b"{}"}]

        async def receive():
            return messages.pop(0) if messages else await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        await ReplayWhenUpstreamDies(stream)(scope, receive, send)

    asyncio.run(go())
    assert [m.get("body") for m in sent[1:]] == [b"data: 1\n\n", b""]


def test_the_middleware_loads_nothing_heavy_into_the_proxy():
    """It is imported by every node's Serve proxy: no torch, no talora settings or engine."""
    import subprocess
    import sys

    code = ("import sys, talora.server.backends.ray.proxy; "
            "print(sorted(m for m in ('torch', 'talora.server.settings', 'talora.server.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
