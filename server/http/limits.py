"""HTTP limits that hold before a route runs, as ASGI middleware.

``BodyLimit`` bounds every request body: a ``Content-Length`` over the route's limit is refused
with 413 before one byte of the body is read, a body that grows past it while it streams (chunked
uploads) is cut off at the limit, and a body that stalls for ``body_timeout_s`` between two reads
gets 408. Both answers close the connection (the rest of the body is never read). The limit is
``max_body_bytes``, or for the adapter upload (``PUT /v1/adapters/{task}``) room for its two
files of ``max_upload_bytes`` each. The refusal is raised from the request's ``receive`` as an
``HTTPException``, so that the matched route answers it in its own error shape (OpenAI's on the
OpenAI routes).

``KeepErrorsInRequest`` turns an exception nobody expected into that request's JSON 500 and
does not re-raise it: a re-raised exception makes uvicorn close the connection, and with it the
next request a client had pipelined on it.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from talora.server.errors import unexpected_error
from talora.server.http.headers import content_length
from talora.server.settings import Settings

log = logging.getLogger(__name__)
CLOSE = {"Connection": "close"}
UPLOAD_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries and part headers around the two files


def _too_large(limit: int, setting: str) -> HTTPException:
    return HTTPException(413, f"body: the request body is over the server's limit of {limit} bytes ({setting})",
                         headers=CLOSE)


def body_limit(settings: Settings, method: str, path: str) -> tuple[int, str]:
    """The largest body of a request to ``method path`` and the setting that says so."""
    if method == "PUT" and path.startswith("/v1/adapters/"):  # an upload: two files
        return 2 * settings.max_upload_bytes + UPLOAD_OVERHEAD_BYTES, "max_upload_bytes"
    return settings.max_body_bytes, "max_body_bytes"


def bounded_receive(scope: Scope, receive: Receive, settings: Settings) -> Receive:
    """``receive`` with the request's body bounded: the first read raises 413 when ``Content-Length``
    is over the route's limit (no byte is read), a read raises 413 once the body grows past it and
    408 when none arrives for ``body_timeout_s``; all as ``HTTPException``."""
    limit, setting = body_limit(settings, scope["method"], scope["path"])
    declared = content_length(scope)
    if declared is not None and declared > limit:
        refused = _too_large(limit, setting)

        async def refuse() -> Message:
            raise refused
        return refuse
    received, complete = 0, False
    timeout_s = settings.body_timeout_s

    async def bounded() -> Message:
        nonlocal received, complete
        if complete:  # after the body: only http.disconnect is left to wait for, however long
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"body: no part of the request body arrived for {timeout_s:g} s "
                                     "(body_timeout_s)", headers=CLOSE) from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit, setting)
            complete = not message.get("more_body", False)
        else:
            complete = True
        return message
    return bounded


async def read_bounded_body(request: Request, settings: Settings) -> bytes:
    """The whole body of ``request`` read through ``bounded_receive``, for code that takes a request
    outside the app (the Ray ingress): 413 / 408 raised as ``HTTPException``."""
    return await Request(request.scope, bounded_receive(request.scope, request.receive, settings)).body()


class BodyLimit:
    """ASGI middleware: bounded request bodies, read within ``body_timeout_s`` per read (``bounded_receive``)."""

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        await self.app(scope, bounded_receive(scope, receive, self.settings), send)


class KeepErrorsInRequest:
    """ASGI middleware: an unexpected exception becomes this request's JSON 500; the connection lives."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:  # noqa: BLE001 - answered here so that the server never sees it
            response = unexpected_error(Request(scope), exc)
            if started:  # a stream was under way: it ends here; the client sees the body stop
                log.error("unhandled %s during the response to %s %s", type(exc).__name__, scope["method"],
                          scope["path"], exc_info=exc)
                return
            await response(scope, receive, send)
