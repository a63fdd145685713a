"""What each route declares in ``/openapi.json``: its error statuses and bodies, and the server's limits.

``task_errors(404, 422)`` and ``openai_errors(...)`` give a route's ``responses=`` entries (the
body shape of each family, ``schemas.ErrorBody`` or ``schemas.OpenAIError``); ``SSE`` adds
``text/event-stream`` to a 200 that can stream. ``install_limits`` writes the limits that come
from ``Settings`` (texts per request, ``max_new_tokens``) into the served document, so that a
request the schema allows is one the server accepts.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from talora.server.http.schemas import ErrorBody, OpenAIError
from talora.server.settings import Settings

REASONS = {400: "the request cannot be served as asked, or its body is not UTF-8",
           401: "a valid bearer token is required",
           403: "the admin routes are off", 404: "no such task or adapter file",
           409: "adapter version conflict, or a training job of the task is active",
           413: "too large: a body, an input (task limit, request limits, KV cache), an upload or a store file",
           422: "a field is invalid (the message names it)", 429: "the queue is full; retry after Retry-After",
           500: "the request's batch step failed", 501: "this server runs no training jobs",
           503: "shutting down, or the engine's worker stopped",
           504: "not finished within request_timeout_s",
           507: "the server has no room to spool the upload (its temporary folder is full)"}
MODEL_ERRORS = (400, 404, 413, 422, 429, 500, 503, 504)  # every route that runs the model can answer these
# With stream: true, server-sent events; the schema describes one event (OpenAPI 3.1 reading of SSE).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"},
    "data": {"type": "string", "description": "JSON: generate sends {type: token, text}, then {type: done, ...} "
                                              "or {type: error, status, message}; completions send OpenAI "
                                              "text_completion chunks, then [DONE]"}}}
SSE: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}}


def task_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": REASONS[code]} for code in codes}


def openai_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": OpenAIError, "description": REASONS[code]} for code in codes}


def _limit(schema: dict, names: tuple[str, ...], key: str, value: int) -> None:
    """Set ``key`` (maximum or maxItems) on the integer or array branch of each property in ``names``."""
    for name in names:
        prop = schema.get("properties", {}).get(name)
        if prop is None:
            continue
        for branch in [prop, *prop.get("anyOf", [])]:
            if branch.get("type") == ("array" if key == "maxItems" else "integer"):
                branch[key] = value


def install_limits(app: FastAPI, settings: Settings) -> None:
    """Serve an OpenAPI document whose bounds are this server's ``Settings``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            for schema in doc.get("components", {}).get("schemas", {}).values():
                _limit(schema, ("text", "prompt"), "maxItems", settings.texts_limit)
                _limit(schema, ("max_new_tokens", "max_tokens"), "maximum", settings.max_new_tokens_limit)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
