"""Training jobs over HTTP, behind the admin token: onboard a task from labelled examples.

``POST /v1/training/jobs`` (JSON) or ``POST /v1/training/jobs/jsonl`` (a JSONL body, one example per line,
the options in the query) queues a job; ``GET /v1/training/jobs`` lists them, ``GET /v1/training/jobs/{id}``
reads one (step, loss, dev score, ETA; at the end the dev and test scores and the installed version),
``GET /v1/training/jobs/{id}/events`` streams its progress (server-sent events),
``POST /v1/training/jobs/{id}/cancel`` cancels it and ``DELETE /v1/training/jobs/{id}`` removes a finished
one. The jobs run in worker processes (``talora.server.training``); docs/serving.md, "Onboarding a task
through the API".
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from talora.server.errors import FieldError, InputTooLong, JobNotFound
from talora.server.http.deps import EngineDep, require_admin, settings_of
from talora.server.http.openapi import task_errors
from talora.server.http.schemas import TrainingJob, TrainingJobList, TrainingJobRequest
from talora.server.http.sse import sse
from talora.server.training.manager import Submission, TrainingManager
from talora.server.training.store import ACTIVE

router = APIRouter(tags=["training"], dependencies=[Depends(require_admin)])
EVENT_POLL_S = 0.5
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "JSON: {type: progress, job} on every change, then {type: done, job}"}}}


def _manager(engine) -> TrainingManager:
    manager = getattr(engine, "training", None)
    if manager is None:
        raise HTTPException(501, "training jobs are off on this server (training_max_running=0, another backend, "
                                 "or --ray: not yet, see docs/serving.md)")
    return manager


async def _submit(engine, body: TrainingJobRequest, request: Request) -> dict:
    manager = _manager(engine)
    limit = settings_of(request).training_max_examples
    if len(body.examples) > limit:
        raise InputTooLong(f"examples: {len(body.examples)} examples is over the server's limit of {limit} "
                           "(training_max_examples)")
    examples = [e.model_dump(exclude_none=True) for e in body.examples]
    sub = Submission(**{**body.model_dump(exclude={"examples"}), "examples": examples})
    return (await run_in_threadpool(manager.submit, sub)).to_json()


ERRORS = task_errors(400, 401, 403, 409, 413, 422, 429, 501)


@router.post("/v1/training/jobs", response_model=TrainingJob, responses=ERRORS)
async def create_job(body: TrainingJobRequest, request: Request, engine: EngineDep) -> dict:
    """Queue a training job of ``task`` from the examples of the body; answers the queued job (poll or stream it)."""
    request.state.task = body.task
    return await _submit(engine, body, request)


@router.post("/v1/training/jobs/jsonl", response_model=TrainingJob, responses=ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": {
                 media: {"schema": {"type": "string", "description": "one JSON object per line: {text, label} (and "
                                                                     "question for an extract task), as a task file"}}
                 for media in ("application/x-ndjson", "text/plain")}}})
async def create_job_jsonl(request: Request, engine: EngineDep, task: str = Query(),
                           kind: Literal["classify", "extract"] = "classify",
                           labels: str | None = Query(None, description="comma-separated label set"),
                           template: str | None = None, language: Literal["en", "zh"] = "en", install: bool = True,
                           version: str | None = None, steps: int = 0, eval_every: int | None = None,
                           seed: int = 0) -> dict:
    """Queue a training job from a JSONL body (the task-file format); the options are query parameters."""
    request.state.task = task
    examples = []
    for number, line in enumerate((await request.body()).decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise FieldError("examples", f"line {number} is not valid JSON") from None
        if not isinstance(row, dict):
            raise FieldError("examples", f"line {number} is not a JSON object")
        examples.append(row)
    given = {"labels": [x for x in labels.split(",") if x] if labels else None, "template": template,
             "version": version, "eval_every": eval_every}
    fields = {"task": task, "kind": kind, "language": language, "install": install, "steps": steps, "seed": seed,
              "examples": examples, **{name: value for name, value in given.items() if value is not None}}
    try:
        body = TrainingJobRequest.model_validate(fields)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    return await _submit(engine, body, request)


@router.get("/v1/training/jobs", response_model=TrainingJobList, responses=task_errors(401, 403, 501))
async def list_jobs(engine: EngineDep) -> dict:
    """Every job this server knows (newest first), finished ones included until they are removed."""
    return {"jobs": [r.to_json() for r in _manager(engine).list()]}


@router.get("/v1/training/jobs/{job_id}", response_model=TrainingJob, responses=task_errors(401, 403, 404, 422, 501))
async def get_job(job_id: str, engine: EngineDep) -> dict:
    """One job: status, progress (step, steps, loss, dev score, ETA) and, at the end, its result or error."""
    return _manager(engine).get(job_id).to_json()


@router.post("/v1/training/jobs/{job_id}/cancel", response_model=TrainingJob,
             responses=task_errors(401, 403, 404, 409, 422, 501))
async def cancel_job(job_id: str, engine: EngineDep) -> dict:
    """Cancel a queued or running job (its worker is stopped; nothing is installed); 409 once it installs or ended."""
    return (await run_in_threadpool(_manager(engine).cancel, job_id)).to_json()


@router.delete("/v1/training/jobs/{job_id}", response_model=TrainingJob,
               responses=task_errors(401, 403, 404, 409, 422, 501))
async def delete_job(job_id: str, engine: EngineDep) -> dict:
    """Remove a finished job and its folder (trained files included); 409 while it is queued or running."""
    return (await run_in_threadpool(_manager(engine).remove, job_id)).to_json()


@router.get("/v1/training/jobs/{job_id}/events", response_model=TrainingJob, responses={
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}, **task_errors(401, 403, 404, 422, 501)})
async def job_events(job_id: str, request: Request, engine: EngineDep):
    """Server-sent events of a job: ``{"type": "progress", "job": ...}`` on every change, then ``{"type": "done",
    "job": ...}`` when it has ended (at once for a job that has). A client that does not accept
    ``text/event-stream`` gets the job as JSON, as from ``GET /v1/training/jobs/{id}``."""
    manager = _manager(engine)
    record = manager.get(job_id)
    if "text/event-stream" not in request.headers.get("accept", ""):
        return record.to_json()

    async def events():
        seen = None
        while True:
            try:
                record = manager.get(job_id)
            except JobNotFound:  # removed while streamed
                return
            view = json.dumps([record.status, record.progress, record.result, record.error], sort_keys=True,
                              default=str)
            if record.status not in ACTIVE:
                yield sse({"type": "done", "job": record.to_json()})
                return
            if view != seen:
                seen = view
                yield sse({"type": "progress", "job": record.to_json()})
            await asyncio.sleep(EVENT_POLL_S)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
