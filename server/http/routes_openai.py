"""OpenAI-compatible completions: ``POST /v1/completions`` with ``model`` = the task name.

The official ``openai`` client works unchanged (``base_url=http://host:port/v1``). The prompt is
rendered through the task's template like ``/generate``. The adapter version is returned as
``system_fingerprint`` and in the ``X-Talora-Adapter-Version`` header. ``GET /v1/models`` lists
the tasks as models.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from talora.server.errors import OPENAI_FORMAT, FieldError
from talora.server.http import bridge
from talora.server.http.deps import EngineDep, settings_of
from talora.server.http.openapi import MODEL_ERRORS, SSE, openai_errors
from talora.server.http.schemas import Completion, CompletionRequest, ModelList
from talora.server.http.sse import stream_events
from talora.server.jobs import Event, Finished, Token


class OpenAIRoute(APIRoute):
    """A route whose errors, its own and the router's (such as 405), use OpenAI's body."""

    async def handle(self, scope, receive, send) -> None:
        scope[OPENAI_FORMAT] = True
        await super().handle(scope, receive, send)


router = APIRouter(tags=["openai"], route_class=OpenAIRoute)


def _completion(cid: str, created: int, task: str, version: str, choices: list[tuple[str, str | None]]) -> dict:
    """A ``text_completion`` (or one chunk of a stream) with a choice per ``(text, finish_reason)``."""
    return {"id": cid, "object": "text_completion", "created": created, "model": task, "system_fingerprint": version,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
                        for index, (text, finish_reason) in enumerate(choices)]}


@router.post("/v1/completions", response_model=Completion, responses={**SSE, **openai_errors(*MODEL_ERRORS)})
async def completions(body: CompletionRequest, request: Request, engine: EngineDep):
    """OpenAI completions; ``model`` names the task."""
    adapter = bridge.lookup(engine, request, body.model)
    prompts = bridge.texts_of(body.prompt, "prompt", settings_of(request))
    if body.stream and len(prompts) > 1:
        raise FieldError("prompt", "streaming takes a single prompt")
    params = bridge.params_of(body.max_tokens or 16, 1.0 if body.temperature is None else body.temperature,
                       body.top_p or 1.0, body.stop, body.seed, settings_of(request), "max_tokens", body.top_k or 0)
    call = bridge.Call(engine, request, "prompt")
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    headers = {bridge.VERSION_HEADER: adapter.version}
    if body.stream:
        def render(event: Event) -> dict:
            if isinstance(event, Finished):
                return _completion(cid, created, body.model, adapter.version, [("", event.finish_reason)])
            assert isinstance(event, Token)
            return _completion(cid, created, body.model, adapter.version, [(event.text, None)])

        async def stream() -> StreamingResponse:
            [gen] = await call.generate(adapter, prompts, body.question, params)
            return await stream_events(gen.events(), render, _stream_error, headers, tail="[DONE]")

        return await call.guard(stream())

    async def run() -> list[Finished]:
        gens = await call.generate(adapter, prompts, body.question, params)
        return await bridge.gather_all([g.result() for g in gens])

    results = await call.guard(run())
    prompt_tokens = sum(r.prompt_tokens for r in results)
    completion_tokens = sum(r.completion_tokens for r in results)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    completion = _completion(cid, created, body.model, adapter.version, [(r.text, r.finish_reason) for r in results])
    return JSONResponse({**completion, "usage": usage}, headers=headers)


def _stream_error(exc: Exception) -> dict:
    return {"error": {"message": str(exc), "type": "server_error", "code": getattr(exc, "status", 504)}}


@router.get("/v1/models", response_model=ModelList)
async def models(engine: EngineDep) -> dict:
    """The loaded tasks as OpenAI models."""
    snapshot = engine.adapters()
    return {"object": "list", "data": [{"id": task, "object": "model", "created": 0, "owned_by": "talora",
                                        "version": a.version} for task, a in sorted(snapshot.items())]}
