"""Health routes: liveness (``/health``), readiness (``/ready``) and Prometheus metrics (``/metrics``)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from talora.server.facade import AdapterFacade
from talora.server.http.deps import EngineDep
from talora.server.http.schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health,
            responses={503: {"model": Health, "description": "the engine's worker has stopped"}})
async def health(engine: EngineDep) -> JSONResponse:
    """Liveness: 200 unless the engine's worker has stopped without being asked to."""
    dead = engine.dead
    return JSONResponse({"status": "dead" if dead else "ok"}, status_code=503 if dead else 200)


@router.get("/ready", response_model=Ready,
            responses={503: {"model": Ready, "description": "loading, draining, no task, a task served before the "
                                                            "last start missing, or the worker stopped"}})
async def ready(engine: EngineDep) -> JSONResponse:
    """Readiness: 200 once the model and at least one adapter are loaded; 503 before, while draining,
    with no task to serve, when the worker has stopped, or while a task served before the last start
    is not served (``missing`` names them; each is loaded again or deleted to clear it)."""
    tasks = len(engine.adapters()) if engine.ready else 0
    missing = engine.loaded.registry.missing() if engine.ready and isinstance(engine, AdapterFacade) else []
    ok = engine.ready and engine.alive() and tasks > 0 and not missing
    body = {"ready": ok, "tasks": tasks} | ({"missing": missing} if missing else {})
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(engine: EngineDep) -> PlainTextResponse:
    """The Prometheus text format."""
    return PlainTextResponse(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)
