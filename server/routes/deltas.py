"""Admin: register (by path or upload), list and delete delta artifacts."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.deps import AdminCaller, GatewayDep, require_admin
from server.errors import BadRequestError
from server.schemas import DeltaCreate, DeltaPublic, DeltasPublic

router = APIRouter(prefix="/v1/deltas", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("", status_code=201)
async def register_delta(
    request: Request, gateway: GatewayDep, name: str | None = Query(default=None)
) -> DeltaPublic:
    """JSON {name, path}: register a file on the gateway's disk.
    application/octet-stream with ?name=: upload the artifact bytes."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/json"):
        try:
            body = DeltaCreate.model_validate(await request.json())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from exc
        record = await gateway.catalog.register_delta_path(body.name, body.path)
    elif ctype.startswith("application/octet-stream"):
        if not name:
            raise BadRequestError("an upload needs the delta's name: POST /v1/deltas?name=NAME")
        record = await gateway.catalog.register_delta_upload(name, request.stream())
    else:
        raise BadRequestError("send JSON {name, path} or the artifact bytes as application/octet-stream")
    return DeltaPublic.of(record)


@router.get("")
async def list_deltas(gateway: GatewayDep, caller: AdminCaller) -> DeltasPublic:
    """Every registered delta (a project's admin key: its project's)."""
    records = [r for r in gateway.registry.state.deltas.values() if caller.may_manage(r.name)]
    return DeltasPublic(data=[DeltaPublic.of(r) for r in records])


@router.get("/{name:path}")
async def get_delta(name: str, gateway: GatewayDep) -> DeltaPublic:
    return DeltaPublic.of(gateway.registry.delta(name))


@router.delete("/{name:path}", status_code=204)
async def delete_delta(name: str, gateway: GatewayDep) -> Response:
    gateway.catalog.delete_delta(name)
    return Response(status_code=204)
