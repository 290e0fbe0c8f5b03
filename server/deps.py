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


# Every dependency is `async def`: FastAPI runs plain `def` dependencies in a thread pool, a
# thread hop per request on the inference hot path.
async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def _matches(token: str | None, allowed: list[str]) -> bool:
    return token is not None and any(secrets.compare_digest(token, a) for a in allowed)


async def require_admin(gateway: GatewayDep, creds: Credentials) -> None:
    """Admin routes need the admin bearer token (separate from inference keys)."""
    check_admin(gateway, f"Bearer {creds.credentials}" if creds else None)


def check_admin(gateway: Gateway, authorization: str | None) -> None:
    """The admin-token check on a raw `Authorization` header."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not _matches(
        token.strip() or None, [gateway.settings.admin_token or ""]
    ):
        raise UnauthorizedError("admin token missing or wrong: send 'Authorization: Bearer <admin token>'")


async def require_api_key(request: Request, gateway: GatewayDep, _: Credentials) -> None:
    """Inference routes need an API key only if the gateway was given some (`_`: the scheme, for
    the OpenAPI schema)."""
    check_api_key(gateway, credential(request.headers))


def credential(headers) -> str | None:
    """The API key as `Authorization: Bearer <key>`, also when sent as Anthropic clients do
    (`x-api-key: <key>`)."""
    if authorization := headers.get("authorization"):
        return authorization
    key = headers.get("x-api-key")
    return f"Bearer {key}" if key else None


def check_api_key(gateway: Gateway, authorization: str | None) -> None:
    """The API-key check on a raw `Authorization` header (for routes that skip dependencies)."""
    keys = gateway.settings.api_keys
    if not keys:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not _matches(token.strip() or None, keys):
        raise UnauthorizedError(
            "API key missing or wrong: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')"
        )
