"""How every failure becomes an HTTP response: one table from exception to status code.

Routes raise; ``install_error_handlers`` maps. Responses carry ``{"detail": message}``, except on
the OpenAI-compatible routes, which use OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` so that its client raises the matching exception.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from talora.adapters.io import AdapterFormatError
from talora.server.engine import InputTooLong, QueueFull, ShuttingDown
from talora.server.registry import AdapterConflict, AdapterNotFound


class JobFailed(RuntimeError):
    """The engine reported a failure for a request (batch error, timeout, shutdown)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RequestTimeout(RuntimeError):
    """The request did not finish within ``request_timeout_s``."""


class BadRequest(ValueError):
    """A well-formed request that cannot be served as asked (e.g. predict on a generate task)."""


class FieldError(ValueError):
    """A request field is out of the server's configured bounds (422, naming the field)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


STATUS = {
    AdapterNotFound: (404, "not_found_error"),
    AdapterFormatError: (400, "invalid_request_error"),
    AdapterConflict: (409, "conflict_error"),
    BadRequest: (400, "invalid_request_error"),
    FieldError: (422, "invalid_request_error"),
    InputTooLong: (413, "invalid_request_error"),
    QueueFull: (429, "rate_limit_error"),
    ShuttingDown: (503, "server_error"),
    RequestTimeout: (504, "timeout_error"),
}


def _is_openai(request: Request) -> bool:
    return request.url.path in ("/v1/completions", "/v1/models")


def error_response(request: Request, status: int, message: str, kind: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    if _is_openai(request):
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    def mapped(request: Request, exc: Exception) -> JSONResponse:
        status, kind = next(v for k, v in STATUS.items() if isinstance(exc, k))
        headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
        return error_response(request, status, str(exc), kind, getattr(exc, "field", None), headers)

    for exc_type in STATUS:
        app.add_exception_handler(exc_type, mapped)

    def job_failed(request: Request, exc: JobFailed) -> JSONResponse:
        headers = {"Retry-After": str(retry_after_s)} if exc.status == 503 else None
        return error_response(request, exc.status, str(exc), "server_error", headers=headers)

    app.add_exception_handler(JobFailed, job_failed)

    def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        message = f"{field}: {first['msg']}"
        if _is_openai(request):
            return error_response(request, 422, message, "invalid_request_error", field)
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
        return JSONResponse({"detail": detail, "message": message}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid)
