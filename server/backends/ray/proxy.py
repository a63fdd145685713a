"""Serve's HTTP proxy, made to answer for an ingress replica that dies while it holds a request.

Ray Serve 2.60 sends each HTTP request from its proxy to one ``TaloraIngress`` replica. When that
replica dies after accepting the request (``kill -9``, a lost node), the proxy sends nothing at all
and its web server answers a plain-text ``500 Internal Server Error``; Serve retries a request on
another replica only while none has accepted it. ``ReplayWhenUpstreamDies`` runs inside the proxy
(Serve calls ``middlewares`` through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``, which
``talora-serve --ray`` sets for the cluster it starts) and keeps each request's body, so that:

- a request the upstream left unanswered is sent again, to another ingress replica, when sending it
  twice cannot do anything twice: ``GET``/``HEAD``, and the inference routes (``POST
  /v1/completions``, ``/v1/tasks/{task}/predict``, ``/v1/tasks/{task}/generate``), which change no
  state; up to ``attempts`` times, 0.2 s apart, then more;
- any other request left unanswered (an adapter upload, a training job), or one still unanswered
  after its attempts, gets the documented ``503`` with ``Retry-After: 1`` and a JSON body, never the
  bare ``500``;
- an answer is held back until it is complete (up to 1 MiB; an event stream goes on at once), so an
  ingress that dies between its status line and its body counts as unanswered; an answer that has
  reached the client passes through untouched: a stream the upstream cut stays cut, as the client
  contract in docs/scale_out.md says.

The proxy holds at most ``replay_bytes`` of a body (default: ``max_body_bytes``): a larger body
streams through unbuffered and is not replayed (the ingress refuses it with 413 anyway). A body that
stalls for ``body_timeout_s`` between two reads gets a JSON ``408``. This module imports no part of
talora that loads torch: it runs in every node's proxy process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talora.server.http.headers import content_length

log = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "talora.server.backends.ray.proxy:middlewares"
REPLAY_BYTES_ENV, ATTEMPTS_ENV, BODY_TIMEOUT_ENV = (
    "TALORA_PROXY_REPLAY_BYTES", "TALORA_PROXY_ATTEMPTS", "TALORA_PROXY_BODY_TIMEOUT_S")
# the routes that change no state: sending one of them again after its first upstream died is safe
REPLAYABLE_POST = re.compile(r"^/v1/(completions|tasks/[^/]+/(predict|generate))/?$")


@dataclass(frozen=True)
class ProxyLimits:
    replay_bytes: int = 4 * 2**20  # Settings.max_body_bytes' default
    attempts: int = 3  # RayOptions.retries' default + 1
    body_timeout_s: float = 15.0  # Settings.body_timeout_s' default

    @classmethod
    def from_env(cls) -> ProxyLimits:
        """The limits ``talora-serve --ray`` exported for the cluster (``env``), else the defaults."""
        return cls(int(os.environ.get(REPLAY_BYTES_ENV, cls.replay_bytes)),
                   max(1, int(os.environ.get(ATTEMPTS_ENV, cls.attempts))),
                   float(os.environ.get(BODY_TIMEOUT_ENV, cls.body_timeout_s)))

    def env(self) -> dict[str, str]:
        """What a node's environment needs for its proxy to load ``middlewares`` with these limits."""
        return {CALLBACK_ENV: CALLBACK, REPLAY_BYTES_ENV: str(self.replay_bytes),
                ATTEMPTS_ENV: str(self.attempts), BODY_TIMEOUT_ENV: str(self.body_timeout_s)}


def middlewares() -> list[Middleware]:
    """Serve's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): the middleware to wrap it in."""
    return [Middleware(ReplayWhenUpstreamDies, limits=ProxyLimits.from_env())]


def replayable(method: str, path: str) -> bool:
    """Whether a request can be sent again after the upstream that held it died, without doing anything twice."""
    return method in ("GET", "HEAD") or (method == "POST" and REPLAYABLE_POST.match(path) is not None)


async def _json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail, "field": None}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class ReplayWhenUpstreamDies:
    """ASGI middleware around Serve's proxy app: see the module docstring."""

    def __init__(self, app: ASGIApp, limits: ProxyLimits | None = None):
        self.app, self.limits = app, limits or ProxyLimits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        declared = content_length(scope)
        kept: list[Message] = []  # the body's messages, to replay
        replay = replayable(method, path) and (declared is None or declared <= self.limits.replay_bytes)
        if replay:
            read = await self._read_body(receive, send)
            if read is None:  # answered (408) or the client left
                return
            kept, complete = read
            replay = complete  # over replay_bytes: the rest streams through, once
        attempts = self.limits.attempts if replay else 1
        for attempt in range(attempts):
            if await self._attempt(scope, self._replaying(kept, receive), send):
                return
            log.warning("%s %s: the ingress replica holding it stopped before answering (attempt %d of %d)",
                        method, path, attempt + 1, attempts)
            if attempt + 1 < attempts:
                await asyncio.sleep(0.2 * (attempt + 1))
        detail = ("the ingress replica serving this request stopped; retry" if replay else
                  "the ingress replica serving this request stopped before answering; it may or may not have "
                  "been carried out: check before sending it again")
        await _json(send, 503, detail, {"Retry-After": "1"})

    async def _read_body(self, receive: Receive, send: Send) -> tuple[list[Message], bool] | None:
        """The body's messages, up to ``replay_bytes``; ``complete`` False when it went past them (the
        messages read so far are then replayed once, before the rest). None: answered, or the client left."""
        kept: list[Message] = []
        size, timeout_s = 0, self.limits.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout_s)
            except asyncio.TimeoutError:
                await _json(send, 408, f"body: no part of the request body arrived for {timeout_s:g} s "
                                       "(body_timeout_s)", {"Connection": "close"})
                return None
            if message["type"] != "http.request":
                return None  # http.disconnect: nobody to answer
            kept.append(message)
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                return kept, True
            if size > self.limits.replay_bytes:
                return kept, False

    @staticmethod
    def _replaying(kept: list[Message], receive: Receive) -> Receive:
        """A ``receive`` that hands out ``kept`` first, then the client's own (the rest of a long body,
        then its disconnect)."""
        pending = list(kept)

        async def replay() -> Message:
            if pending:
                return pending.pop(0)
            return await receive()
        return replay

    async def _attempt(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Run the proxy once; True when its answer reached the client (or began to).

        The answer is held back until it is complete, up to ``HOLD_BYTES`` (an event stream is passed on
        at once): the ingress can die between its status line and its body, and an answer the client
        has not seen any of can still be replaced by the next attempt's."""
        held: list[Message] = []
        size, passed, complete = 0, False, False

        async def holding(message: Message) -> None:
            nonlocal size, passed, complete
            if passed:
                await send(message)
                return
            held.append(message)
            if message["type"] == "http.response.body":
                size += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            if complete or size > HOLD_BYTES or _event_stream(held[0]):
                passed = True
                for item in held:
                    await send(item)
                held.clear()

        try:
            await self.app({**scope, "headers": list(scope.get("headers", ()))}, receive, holding)
        except Exception:
            if passed:
                raise
            log.warning("the proxy failed before answering", exc_info=True)
        return passed


HOLD_BYTES = 2**20  # an answer larger than this reaches the client as it comes, and is not replaced


def _event_stream(start: Message) -> bool:
    return start.get("type") == "http.response.start" and any(
        name.lower() == b"content-type" and value.startswith(b"text/event-stream")
        for name, value in start.get("headers", ()))
