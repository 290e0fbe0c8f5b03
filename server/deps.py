"""FastAPI dependencies: the gateway service and the two kinds of credentials."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.errors import ForbiddenError
from server.gateway import Gateway
from server.metrics import Metrics
from server.tenancy import Principal, not_managed

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


async def require_admin(request: Request, gateway: GatewayDep, creds: Credentials) -> Principal:
    """Admin routes need the admin token (root), or a project key with admin scope, which manages
    only its project's names (the route's `{name}`, a created name, the deltas and variants it uses)."""
    caller = check_admin(gateway, f"Bearer {creds.credentials}" if creds else None)
    if not caller.root:
        await _check_manages(request, caller)
    request.state.caller = caller
    return caller


def check_admin(gateway: Gateway, authorization: str | None) -> Principal:
    """The admin check on a raw `Authorization` header: root or a project admin key."""
    return gateway.keys.principal(authorization, admin=True)


async def _check_manages(request: Request, caller: Principal) -> None:
    """403 unless every name the admin call acts on is under `caller`'s project prefix."""
    route = request.scope.get("route")
    prefix = getattr(route, "path", request.url.path).split("/{")[0]  # "/v1/variants/{name:path}"
    if prefix not in PROJECT_ROUTES:
        raise ForbiddenError(f"{prefix} needs the admin token (root)")
    if prefix in ("/v1/evals", "/v1/rebases"):  # their services check the names they use, and owners
        return
    names = [request.path_params["name"]] if "name" in request.path_params else []
    if request.method in ("POST", "PUT") and request.headers.get("content-type", "").startswith(
        "application/json"
    ):
        body = await request.json()
        if isinstance(body, dict):
            names += [body["name"]] if isinstance(body.get("name"), str) else []
            for term in body.get("deltas") or body.get("targets") or []:
                used = term.get("delta") or term.get("variant") if isinstance(term, dict) else None
                names += [used] if isinstance(used, str) else []
    elif request.method == "POST" and "name" in request.query_params:
        names.append(request.query_params["name"])
    for name in names:
        if not caller.may_manage(name):
            raise not_managed(caller, name)


# Admin routes a project's admin key may call, on its own names; every other one is root's.
PROJECT_ROUTES = frozenset(
    {"/v1/deltas", "/v1/variants", "/v1/aliases", "/v1/bases", "/v1/usage", "/v1/evals", "/v1/rebases"}
)


async def require_api_key(request: Request, gateway: GatewayDep, _: Credentials) -> Principal:
    """Inference routes need a key if the gateway has any (`_`: the scheme, for the OpenAPI schema)."""
    return check_api_key(gateway, credential(request.headers))


def credential(headers) -> str | None:
    """The API key as `Authorization: Bearer <key>`, also when sent as Anthropic clients do
    (`x-api-key: <key>`)."""
    if authorization := headers.get("authorization"):
        return authorization
    key = headers.get("x-api-key")
    return f"Bearer {key}" if key else None


def check_api_key(gateway: Gateway, authorization: str | None) -> Principal:
    """Who calls an inference route, from a raw `Authorization` header (for routes that skip
    dependencies); 401 if a key is needed and this one is missing or unknown."""
    return gateway.keys.principal(authorization)


Caller = Annotated[Principal, Depends(require_api_key)]
AdminCaller = Annotated[Principal, Depends(require_admin)]


async def require_root(gateway: GatewayDep, creds: Credentials) -> None:
    """Routes only the admin token may call (keys: the platform team hands them out)."""
    caller = check_admin(gateway, f"Bearer {creds.credentials}" if creds else None)
    if not caller.root:
        raise ForbiddenError("managing keys needs the admin token (root)")
