"""OpenAI-compatible completions: ``POST /v1/completions`` with ``model`` = the task name.

The official ``openai`` client works unchanged (``base_url=http://host:port/v1``). The prompt is
rendered through the task's template like ``/generate``. The adapter version is returned as
``system_fingerprint`` and in the ``X-Talora-Adapter-Version`` header. ``GET /v1/models`` lists
the tasks as models.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from talora.server import bridge
from talora.server.errors import FieldError
from talora.server.jobs import Finished
from talora.server.openapi import MODEL_ERRORS, SSE, openai_errors
from talora.server.routes_tasks import VERSION_HEADER, params_of, texts_of
from talora.server.schemas import Completion, CompletionRequest

router = APIRouter()


def _chunk(cid: str, created: int, task: str, version: str, text: str, finish_reason: str | None,
           index: int = 0) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": task,
            "system_fingerprint": version,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]}


@router.post("/v1/completions", response_model=Completion, responses={**SSE, **openai_errors(*MODEL_ERRORS)})
async def completions(body: CompletionRequest, request: Request):
    engine = bridge.engine_of(request)
    adapter = bridge.lookup(request, body.model)
    prompts = texts_of(body.prompt, "prompt", engine.settings)
    if body.stream and len(prompts) > 1:
        raise FieldError("prompt", "streaming takes a single prompt")
    params = params_of(body.max_tokens or 16, 1.0 if body.temperature is None else body.temperature,
                       body.top_p or 1.0, body.stop, body.seed, request, "max_tokens")
    gens: list[bridge.Generation] = []
    try:
        for prompt in prompts:
            gens.append(await bridge.generate(engine, adapter, prompt, None, params))
    except BaseException:
        for gen in gens:
            gen.job.cancel()
        raise
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    headers = {VERSION_HEADER: adapter.version}
    if body.stream:
        events = gens[0].events()
        first = await anext(events)  # errors before the first token still get their status code
        return StreamingResponse(_stream(first, events, cid, created, body.model, adapter.version),
                                 media_type="text/event-stream", headers=headers)
    results: list[Finished] = await asyncio.gather(*(g.result() for g in gens))
    choices = [{"text": r.text, "index": i, "logprobs": None, "finish_reason": r.finish_reason}
               for i, r in enumerate(results)]
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": body.model,
                         "system_fingerprint": adapter.version, "choices": choices,
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens}}, headers=headers)


async def _stream(first, events, cid: str, created: int, task: str, version: str):
    event = first
    try:
        while True:
            if isinstance(event, Finished):
                yield f"data: {json.dumps(_chunk(cid, created, task, version, '', event.finish_reason))}\n\n"
                break
            yield f"data: {json.dumps(_chunk(cid, created, task, version, event.text, None))}\n\n"
            event = await anext(events)
    except Exception as exc:  # noqa: BLE001 - headers are sent: report in the stream
        error = {"error": {"message": str(exc), "type": "server_error", "code": getattr(exc, "status", 504)}}
        yield f"data: {json.dumps(error)}\n\n"
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"


@router.get("/v1/models")
async def models(request: Request) -> dict:
    snapshot = bridge.engine_of(request).adapters()
    return {"object": "list", "data": [{"id": task, "object": "model", "created": 0, "owned_by": "talora",
                                        "version": a.version} for task, a in sorted(snapshot.items())]}
