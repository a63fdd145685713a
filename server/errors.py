"""How every failure becomes an HTTP response: the server's exceptions and one table from exception
to status code.

The engine and the routes raise; ``install_error_handlers`` maps. Responses carry ``schemas.ErrorBody``
(``{"detail": message, "field": name or null}``, plus ``errors`` on a 422), except on the
OpenAI-compatible routes, which use OpenAI's ``{"error": {"message", "type", "param", "code"}}``
so that its client raises the matching exception (their route class marks the request's scope
with ``OPENAI_FORMAT``). An exception nobody expected is a JSON 500.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from talora.adapters.formats.io import AdapterFormatError
from talora.server.adapter_registry import AdapterConflict, AdapterNotFound, AdapterTooLarge

log = logging.getLogger(__name__)


class BundleMissing(RuntimeError):
    """No bundle was given and the demo bundle has not been built."""


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` requests."""


class ShuttingDown(RuntimeError):
    """The engine is draining and takes no new work."""


class InputTooLong(ValueError):
    """An input does not fit the task's limit (``on_overflow=reject``) or the KV cache."""


class WorkerDead(RuntimeError):
    """The worker thread has stopped for good; the process is about to exit (or should be restarted)."""


class JobFailed(RuntimeError):
    """The engine reported a failure for a request (batch error, timeout, shutdown)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RequestTimeout(RuntimeError):
    """The request did not finish within ``request_timeout_s``."""


class BadRequest(ValueError):
    """A well-formed request that cannot be served as asked (e.g. predict on a generate task)."""


class JobNotFound(KeyError):
    """No training job has this id."""

    def __str__(self) -> str:
        return str(self.args[0])


class JobConflict(RuntimeError):
    """Another job of the task is queued or running, or a job cannot be cancelled or removed now."""


class FieldError(ValueError):
    """A request field is out of the server's configured bounds (422, naming the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


STATUS = {  # the first entry that matches wins: a subclass comes before its base
    AdapterNotFound: (404, "not_found_error"),
    AdapterTooLarge: (413, "invalid_request_error"),
    AdapterFormatError: (400, "invalid_request_error"),
    AdapterConflict: (409, "conflict_error"),
    JobNotFound: (404, "not_found_error"),
    JobConflict: (409, "conflict_error"),
    BadRequest: (400, "invalid_request_error"),
    InputTooLong: (413, "invalid_request_error"),  # before FieldError: bridge.RequestTooLarge is both
    FieldError: (422, "invalid_request_error"),
    QueueFull: (429, "rate_limit_error"),
    ShuttingDown: (503, "server_error"),
    WorkerDead: (503, "server_error"),
    RequestTimeout: (504, "timeout_error"),
}


OPENAI_FORMAT = "talora.openai_errors"  # scope key: the matched route answers errors in OpenAI's shape


def error_response(request: Request, status: int, message: str, kind: str, param: str | None = None,
                   headers: Mapping[str, str] | None = None, errors: list[dict] | None = None) -> JSONResponse:
    """The one error body of each route family: ``ErrorBody``, or ``OpenAIError`` on the OpenAI routes."""
    if request.scope.get(OPENAI_FORMAT):
        body: dict = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    else:
        body = {"detail": message, "field": param}
        if errors is not None:
            body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers)


MAX_REPORTED_ERRORS = 20  # a 422 lists at most this many validation errors; its detail says how many there were
_TYPE_MISMATCH = ("_type", "is_instance_of", "union_tag_invalid")


def _relevance(error: dict) -> tuple[bool, int]:
    """Which validation error a 422's detail reports: in a union, a branch of the right JSON type that
    failed a constraint says more than "should be a valid list"; then the deepest."""
    return (not error["type"].endswith(_TYPE_MISMATCH), len(error["loc"]))


def field_loc(loc: tuple | list) -> list[str | int]:
    """``("body", "text", "list[...]", 3)`` -> ``["body", "text", 3]``: pydantic's union-branch tags left out
    (request bodies are flat: the field is the first name after the source, then item indices)."""
    parts = list(loc)
    head = parts[:2] if parts and parts[0] in ("body", "path", "query", "header") else parts[:1]
    return [str(p) for p in head] + [p for p in parts[len(head):] if isinstance(p, int)]


def field_name(loc: tuple | list) -> str:
    """``("body", "text", 3, "function-after[...]")`` -> ``text[3]``: the field and item, not pydantic's tags."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "path", "query") else list(loc)
    if not parts:
        return "body"
    return str(parts[0]) + "".join(f"[{p}]" for p in parts[1:] if isinstance(p, int))


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    def mapped(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, JobFailed):  # the status the engine gave: 500, 503, 504 (or 499, nobody listening)
            status, kind = exc.status, "server_error"
        else:
            status, kind = next(v for k, v in STATUS.items() if isinstance(exc, k))
        headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
        return error_response(request, status, str(exc), kind, getattr(exc, "field", None), headers)

    for exc_type in (*STATUS, JobFailed):
        app.add_exception_handler(exc_type, mapped)

    def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors() or [{"loc": (), "msg": "invalid request", "type": "value_error"}]
        main = max(errors, key=_relevance)
        field = field_name(main["loc"])
        issues = [{"loc": field_loc(e["loc"]), "msg": e["msg"], "type": e["type"]}
                  for e in errors[:MAX_REPORTED_ERRORS]]
        more = f" ({len(errors) - 1} more errors, the first {MAX_REPORTED_ERRORS} in 'errors')" \
            if len(errors) > 1 else ""
        return error_response(request, 422, f"{field}: {main['msg']}{more}", "invalid_request_error", field,
                              errors=issues)

    def http_error(request: Request, exc: Exception) -> JSONResponse:
        """Starlette's own errors (unknown path, wrong method, a body that is not UTF-8) in the route's shape."""
        assert isinstance(exc, StarletteHTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(request, exc.status_code, str(exc.detail), kind, headers=exc.headers)

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)


def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """The JSON 500 of an exception nobody expected (``limits.KeepErrorsInRequest`` sends it)."""
    log.error("unhandled %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return error_response(request, 500, f"internal error: {type(exc).__name__}", "server_error")
