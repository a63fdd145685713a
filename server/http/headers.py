"""Reading an ASGI request's headers, without importing anything heavy (Serve's proxy imports this too)."""

from __future__ import annotations

from starlette.types import Scope


def content_length(scope: Scope) -> int | None:
    """The request's declared body size; None when it declares none or a malformed one (h11 refuses a
    malformed Content-Length before the app sees the request)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":  # ASGI header names are lower case
            try:
                return int(value)
            except ValueError:
                return None
    return None
