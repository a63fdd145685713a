"""What routes depend on, as types (FastAPI ``Depends``): the engine, the settings, and admin authorisation.

``EngineDep`` is the app's engine and ``SettingsDep`` its settings (``create_app`` puts both in
``app.state``; the engine itself has only its ``EngineConfig``). ``require_admin`` is
the admin router's dependency: 403 when no admin token is configured, 401 (with
``WWW-Authenticate: Bearer``) when the request's bearer token is not the configured one.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from starlette.exceptions import HTTPException

from talora.server.facade import ServingEngine
from talora.server.settings import Settings


def get_engine(request: Request) -> ServingEngine:
    return request.app.state.engine


EngineDep = Annotated[ServingEngine, Depends(get_engine)]


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(settings_of)]


def require_admin(request: Request, settings: SettingsDep) -> None:
    if not settings.admin_enabled:
        raise HTTPException(403, "the admin routes are off: set TALORA_ADMIN_TOKEN (--admin-token)")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = settings.admin_token.get_secret_value() if settings.admin_token else ""
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), expected.encode()):
        raise HTTPException(401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})
