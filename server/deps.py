"""FastAPI dependencies: the gateway service and the two kinds of credentials."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import UnauthorizedError
from server.gateway import Gateway
from server.metrics import Metrics

_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def _matches(token: str | None, allowed: list[str]) -> bool:
    return token is not None and any(secrets.compare_digest(token, a) for a in allowed)


def require_admin(gateway: GatewayDep, creds: Credentials) -> None:
    """Admin routes need the admin bearer token (separate from inference keys)."""
    token = creds.credentials if creds else None
    if not _matches(token, [gateway.settings.admin_token or ""]):
        raise UnauthorizedError("admin token missing or wrong: send 'Authorization: Bearer <admin token>'")


def require_api_key(gateway: GatewayDep, creds: Credentials) -> None:
    """Inference routes need an API key only if the gateway was given some."""
    keys = gateway.settings.api_keys
    if keys and not _matches(creds.credentials if creds else None, keys):
        raise UnauthorizedError("API key missing or wrong: send 'Authorization: Bearer <key>'")
