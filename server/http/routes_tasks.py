"""Task routes: predict (label scores), generate (JSON or server-sent events), task listing.

Each route validates, pins the task's current adapter version, and hands off to a ``bridge.Call``
(limits, tokenising, jobs; its ``guard`` cancels them when the client goes away or time runs out,
until a stream's response starts); every response names that version (body and
``X-Talora-Adapter-Version`` header).
"""

from __future__ import annotations

import json
import math

from fastapi import APIRouter, Request, Response

from talora.server.errors import BadRequest
from talora.server.http import bridge
from talora.server.http.deps import EngineDep, SettingsDep, settings_of
from talora.server.http.openapi import MODEL_ERRORS, SSE, task_errors
from talora.server.http.schemas import (
    GenerateRequest,
    GenerateResult,
    PredictMany,
    PredictOne,
    PredictRequest,
    TaskInfo,
    TaskList,
)
from talora.server.http.sse import stream_events
from talora.server.jobs import Event, Finished, Token

router = APIRouter(tags=["tasks"])


def _label_result(labels: list[str], scores: list[float], truncated: bool) -> dict:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    best = max(range(len(labels)), key=lambda i: scores[i])
    return {"label": labels[best], "scores": dict(zip(labels, scores)),
            "probabilities": {label: w / total for label, w in zip(labels, weights)}, "truncated": truncated}


@router.post("/v1/tasks/{task}/predict", response_model=PredictOne | PredictMany,
             responses=task_errors(*MODEL_ERRORS))
async def predict(task: str, body: PredictRequest, request: Request, response: Response, engine: EngineDep) -> dict:
    """Score every label of a classify task for one text or a list of texts."""
    adapter = bridge.lookup(engine, request, task)
    if adapter.meta.kind != "classify":
        raise BadRequest(f"task {task!r} is a {adapter.meta.kind} task: use /v1/tasks/{task}/generate")
    texts = bridge.texts_of(body.text, "text", settings_of(request))
    call = bridge.Call(engine, request, "text")
    results = await call.guard(call.score(adapter, texts, body.question))
    response.headers[bridge.VERSION_HEADER] = adapter.version
    labels = list(adapter.meta.labels)
    out = [_label_result(labels, scores, truncated) for scores, truncated in results]
    head = {"task": task, "version": adapter.version}
    return {**head, **out[0]} if isinstance(body.text, str) else {**head, "results": out}


@router.post("/v1/tasks/{task}/generate", response_model=GenerateResult,
             responses={**SSE, **task_errors(*MODEL_ERRORS)})
async def generate(task: str, body: GenerateRequest, request: Request, engine: EngineDep):
    """Continue the task's prompt; ``stream: true`` sends server-sent events."""
    adapter = bridge.lookup(engine, request, task)
    params = bridge.params_of(body.max_new_tokens, body.temperature, body.top_p, body.stop, body.seed,
                       settings_of(request), "max_new_tokens", body.top_k)
    call = bridge.Call(engine, request, "text")
    head = {"task": task, "version": adapter.version}
    headers = {bridge.VERSION_HEADER: adapter.version}

    def done(event: Finished, truncated: bool) -> dict:
        return {**head, "text": event.text, "finish_reason": event.finish_reason,
                "prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                "truncated": truncated}

    async def answer() -> Response:
        [gen] = await call.generate(adapter, [body.text], body.question, params)
        if not body.stream:
            return Response(json.dumps(done(await gen.result(), gen.truncated)), media_type="application/json",
                            headers=headers)

        def render(event: Event) -> dict:
            if isinstance(event, Finished):
                return {"type": "done", **done(event, gen.truncated)}
            assert isinstance(event, Token)
            return {"type": "token", "text": event.text}

        return await stream_events(gen.events(), render, _stream_error, headers)

    return await call.guard(answer())


def _stream_error(exc: Exception) -> dict:
    return {"type": "error", "status": getattr(exc, "status", 504), "message": str(exc)}


@router.get("/v1/tasks", response_model=TaskList)
async def list_tasks(engine: EngineDep, settings: SettingsDep) -> dict:
    """Loaded tasks with their metadata and versions; ``resident``: task KV is in a device slot."""
    resident, bundle = engine.resident, engine.bundle
    tasks = [{**a.describe(), "resident": a.key in resident} for _, a in sorted(engine.adapters().items())]
    return {"tasks": tasks, "num_slots": settings.num_slots,
            "bundle": {"fingerprint": bundle.fingerprint, "base_model": bundle.base_model}}


@router.get("/v1/tasks/{task}", response_model=TaskInfo, responses=task_errors(404, 422))
async def get_task(task: str, request: Request, engine: EngineDep) -> dict:
    """One loaded task's metadata and current version."""
    adapter = bridge.lookup(engine, request, task)
    return {**adapter.describe(), "resident": adapter.key in engine.resident}
