"""The HTTP application: ``create_app(settings, engine)``.

The lifespan starts the engine (model load, shared KV, adapters) in a worker thread and, on
shutdown (SIGTERM under uvicorn, after uvicorn has let the requests in flight finish), drains
and stops it. ``RequestLog`` writes one info line per request and counts it in the metrics by
task, endpoint and status. Routes live in ``routes_*``, what they depend on in ``deps``, the limits
that hold before a route runs in ``limits``.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from talora.server.errors import install_error_handlers
from talora.server.facade import ServingEngine
from talora.server.http import routes_admin, routes_health, routes_openai, routes_tasks, routes_training
from talora.server.http.limits import BodyLimit, KeepErrorsInRequest
from talora.server.http.openapi import install_limits
from talora.server.settings import Settings

log = logging.getLogger("talora.server.requests")


class RequestLog:
    """ASGI middleware: one log line and one ``talora_requests`` count per HTTP request."""

    def __init__(self, app, engine: ServingEngine):
        self.app, self.engine = app, engine

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        state = scope.setdefault("state", {})
        state["arrived"] = time.monotonic()  # the request deadline counts from here: reading the body counts too

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self._record(scope, state, status, time.perf_counter() - start)

    def _record(self, scope, state: dict, status: int, elapsed: float) -> None:
        route = scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        task = state.get("task", "-")
        m = self.engine.metrics
        m.requests.labels(task, endpoint, str(status)).inc()
        m.total_seconds.labels(endpoint).observe(elapsed)
        log.info("%s %s status=%d task=%s version=%s %.1f ms", scope["method"], scope["path"], status, task,
                 state.get("version", "-"), elapsed * 1e3)


def create_app(settings: Settings, engine: ServingEngine) -> FastAPI:
    """The FastAPI app serving ``engine`` (the in-process ``Engine`` or ``VllmEngine``); the engine starts
    with the app's lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.ready:
            await run_in_threadpool(engine.start)
        yield
        await run_in_threadpool(engine.stop, settings.drain_timeout_s)

    app = FastAPI(title="talora-serve", summary="many TA-LoRA task adapters on one frozen LM", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    install_error_handlers(app, settings.retry_after_s)
    install_limits(app, settings)
    for routes in (routes_tasks, routes_openai, routes_admin, routes_training, routes_health):
        app.include_router(routes.router)
    app.add_middleware(BodyLimit, settings=settings)  # innermost of the three: bodies are bounded
    app.add_middleware(KeepErrorsInRequest)  # an unexpected error is its request's 500, never the server's
    app.add_middleware(RequestLog, engine=engine)  # outermost: it sees the status every request ends with
    return app
