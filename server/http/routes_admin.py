"""Admin routes: load, replace and evict task adapters while serving, behind a bearer token.

``PUT /v1/adapters/{task}`` takes either a JSON body ``{"path": "<relative path in the store>"}``
(default: the task name), no body (same), or a multipart upload with the parts ``metadata``
(``<task>.json``) and ``tensors`` (``<task>.safetensors``). The new version is validated in full
before it replaces the old one, atomically (then kept in the store's last-known-good area, see
``registry``); requests already admitted finish with the version they started with; the answer's
``previous_version`` is the version the install replaced. ``DELETE /v1/adapters/{task}`` evicts a
task (and its last-known-good copy). A store file over ``max_upload_bytes`` is a 413, like an
upload over it; an upload the server has no room to spool is a 507. The router depends on
``deps.require_admin``: with no token configured the routes answer 403, without the token 401.
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from talora.adapters.formats.io import AdapterFormatError
from talora.server.errors import InputTooLong
from talora.server.http.deps import EngineDep, require_admin, settings_of
from talora.server.http.openapi import task_errors
from talora.server.http.schemas import AdapterEvicted, AdapterLoaded

router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)])


async def _read_upload(request: Request, limit: int) -> tuple[bytes, bytes]:
    parts = {}
    try:
        form = await request.form(max_part_size=limit)
        for name in ("metadata", "tensors"):
            part = form.get(name)
            if part is None or isinstance(part, str):
                raise AdapterFormatError(f"{name}: the upload needs a file part named {name!r}")
            parts[name] = await part.read(limit + 1)
            if len(parts[name]) > limit:
                raise InputTooLong(f"{name}: the upload is over max_upload_bytes={limit}")
    except OSError as exc:  # the parts are spooled to the temporary folder: full (ENOSPC), quota, I/O error
        raise HTTPException(507, f"upload: the server has no room for the upload's parts ({exc.strerror or exc}); "
                                 "retry later, or load the adapter from the store by path") from None
    return parts["metadata"], parts["tensors"]


async def _store_path(request: Request, task: str) -> str:
    raw = await request.body()
    if not raw.strip():
        return task
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterFormatError("body: not valid JSON") from None
    except RecursionError:
        raise AdapterFormatError("body: nested too deeply (expected {\"path\": \"...\"})") from None
    if not isinstance(body, dict) or set(body) - {"path"}:
        raise AdapterFormatError("body: expected {\"path\": \"<relative path in the adapter store>\"}")
    path = body.get("path", task)
    if not isinstance(path, str) or not path:
        raise AdapterFormatError("path: must be a non-empty string")
    return path


PUT_BODY = {"required": False, "content": {
    "application/json": {"schema": {"type": "object", "additionalProperties": False, "properties": {
        "path": {"type": "string", "minLength": 1, "description": "relative path in the store, no suffix"}}}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["metadata", "tensors"], "properties": {
        "metadata": {"type": "string", "format": "binary", "description": "<task>.json"},
        "tensors": {"type": "string", "format": "binary", "description": "<task>.safetensors"}}}}}}


@router.put("/v1/adapters/{task}", response_model=AdapterLoaded,
            responses=task_errors(400, 401, 403, 404, 409, 413, 422, 507), openapi_extra={"requestBody": PUT_BODY})
async def put_adapter(task: str, request: Request, engine: EngineDep) -> dict:
    """Load or replace ``task`` from the store or an upload; the old version serves until then."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        meta_bytes, blob = await _read_upload(request, settings_of(request).max_upload_bytes)
        adapter, changed = await run_in_threadpool(engine.load_bytes, task, meta_bytes, blob)
    else:
        # a store file over max_upload_bytes is AdapterTooLarge: 413, as an upload over the same limit
        adapter, changed = await run_in_threadpool(engine.load_store, task, await _store_path(request, task))
    request.state.task, request.state.version = task, adapter.version
    # the version this load replaced, read in the registry's install step (a concurrent PUT cannot slip between)
    previous = adapter.replaced if changed else adapter.version
    return {"task": task, "version": adapter.version, "previous_version": previous, "changed": changed,
            "source": adapter.source}


@router.delete("/v1/adapters/{task}", response_model=AdapterEvicted, responses=task_errors(401, 403, 404, 422))
async def delete_adapter(task: str, request: Request, engine: EngineDep) -> dict:
    """Evict ``task``: new requests get 404, requests in flight finish with their version."""
    adapter = await run_in_threadpool(engine.evict, task)
    request.state.task, request.state.version = task, adapter.version
    return {"task": task, "evicted_version": adapter.version}
