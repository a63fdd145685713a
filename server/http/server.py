"""The uvicorn server of ``talora-serve``: connection limits, the listening socket, and the drain.

``GuardedH11Protocol`` is uvicorn's HTTP/1.1 protocol with two limits uvicorn lacks: a connection
beyond ``max_connections`` is answered 503 and closed as soon as it opens (before it can hold a
file descriptor for long), and a connection that has not sent a whole request head within
``header_timeout_s`` (after it opened, or after its last answer) gets 408 and is closed, so that
clients sending half a header cannot hold connections open. Idle keep-alive connections close after
``keep_alive_timeout_s`` (uvicorn's own timer).

``TaloraServer`` drains on SIGTERM/SIGINT: new requests get 503, the requests in flight get
``drain_timeout_s`` to finish, then the engine fails what is left with its 503 JSON (``Retry-After``;
an ``error`` event on a stream), before uvicorn would cut them with a plain-text 500.

``bind_socket`` opens the listening socket before the model loads, so that a busy port is reported
at once rather than after the load.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
import socket
import time
from contextlib import suppress
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from talora.server.settings import Settings

log = logging.getLogger(__name__)
DRAIN_MARGIN_S = 5.0  # uvicorn's own cut-off comes this long after the engine has failed what was left
FD_RESERVE = 64  # file descriptors kept free of client connections: the model, the store, logs, threads
REFUSAL_LOG_INTERVAL_S = 10.0


class _Refusals:
    """Counts refused connections and logs them at most once per ``REFUSAL_LOG_INTERVAL_S`` (a flood of
    connections must not become a flood of log lines)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.logged_at = 0.0

    def add(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self.logged_at >= REFUSAL_LOG_INTERVAL_S:
            log.warning("connections closed since the last report: %s",
                        ", ".join(f"{n} {why}" for why, n in sorted(self.counts.items())))
            self.counts, self.logged_at = {}, now


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap and a request-head timeout (class attributes set by
    ``guarded_protocol``)."""

    max_connections = 1024
    header_timeout_s = 10.0
    refusals = _Refusals()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.refusals.add("over max_connections")
            self._answer_and_close(503, "the server has max_connections open connections; retry later",
                                   [(b"retry-after", b"1")])
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():
            if self._head_timer is None:
                self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # an idle connection is uvicorn's keep-alive timer's; data of a next head re-arms ours
        self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return (self.cycle is None or self.cycle.response_complete) and self.conn.their_state in (h11.IDLE,
                                                                                                  h11.DONE)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._waiting_for_head():
            return
        self.refusals.add("request head not sent within header_timeout_s")
        self._answer_and_close(408, f"the request head did not arrive within {self.header_timeout_s:g} s "
                                    "(header_timeout_s)")

    def _answer_and_close(self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer outside h11 (which answers only a parsed request) and close: no request was read."""
        body = json.dumps({"detail": message, "field": None}).encode()
        reason = {408: b"Request Timeout", 503: b"Service Unavailable"}[status]
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"), *(headers or [])]
        lines = [b"HTTP/1.1 %d %s" % (status, reason), *(name + b": " + value for name, value in head)]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transport.close()


def max_connections(settings: Settings) -> int:
    """``settings.max_connections``, lowered to fit the process's file limit (raised to its hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return settings.max_connections
    fitting = max(8, soft - FD_RESERVE)
    if fitting < settings.max_connections:
        log.warning("max_connections lowered from %d to %d: the process may open %d files",
                    settings.max_connections, fitting, soft)
    return min(settings.max_connections, fitting)


def guarded_protocol(settings: Settings) -> type[GuardedH11Protocol]:
    """A ``GuardedH11Protocol`` class carrying ``settings``' limits."""
    return type("TaloraH11Protocol", (GuardedH11Protocol,), {
        "max_connections": max_connections(settings), "header_timeout_s": settings.header_timeout_s,
        "refusals": _Refusals()})


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``app`` under ``settings``' limits (``overrides``: e.g. the port)."""
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level, "access_log": False,
        "http": guarded_protocol(settings), "timeout_keep_alive": settings.keep_alive_timeout_s,
        "timeout_graceful_shutdown": math.ceil(settings.drain_timeout_s + DRAIN_MARGIN_S),
        "h11_max_incomplete_event_size": 64 * 1024,  # the request line and headers together (h11's default 16 KiB)
        "lifespan": "on", **overrides}
    return uvicorn.Config(app, **options)


class TaloraServer(uvicorn.Server):
    """uvicorn's server, draining the engine on shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, engine: Any, drain_timeout_s: float):
        super().__init__(config)
        self.engine, self.drain_timeout_s = engine, drain_timeout_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # the engine stops taking work now (503), finishes what it has for drain_timeout_s, then fails the
        # rest with 503: every request in flight is answered before uvicorn's own timeout cuts it
        loop = asyncio.get_running_loop()
        drained = loop.run_in_executor(None, self.engine.stop, self.drain_timeout_s)
        await super().shutdown(sockets)
        await drained


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; ``OSError`` (e.g. the port is busy) says which."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock
