"""Admin: aliases, stable public model names moved between variants atomically (with rollback)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from server.catalog import require_name
from server.deps import AdminCaller, GatewayDep, require_admin
from server.schemas import AliasCreate, AliasesPublic, AliasPublic, AliasUpdate

router = APIRouter(prefix="/v1/aliases", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("", status_code=201)
async def create_alias(body: AliasCreate, gateway: GatewayDep) -> AliasPublic:
    """A new alias over existing variants (409 if the name is taken)."""
    return AliasPublic.of(gateway.registry.set_alias(body.name, body.targets, create=True))


@router.get("")
async def list_aliases(gateway: GatewayDep, caller: AdminCaller) -> AliasesPublic:
    """Every alias (a project's admin key: its project's)."""
    aliases = sorted(gateway.registry.state.aliases.items())
    return AliasesPublic(data=[AliasPublic.of(a) for name, a in aliases if caller.may_manage(name)])


@router.post("/{name:path}/rollback")
async def rollback_alias(name: str, gateway: GatewayDep) -> AliasPublic:
    """Point the alias back at its targets before the last change."""
    return AliasPublic.of(gateway.registry.rollback_alias(name))


@router.get("/{name:path}")
async def get_alias(name: str, gateway: GatewayDep) -> AliasPublic:
    return AliasPublic.of(gateway.registry.alias(name))


@router.put("/{name:path}")
async def put_alias(name: str, body: AliasUpdate, gateway: GatewayDep) -> AliasPublic:
    """Move (or create) an alias in one atomic change: requests admitted before it finish on the
    variant they got; every later one resolves to the new targets."""
    require_name(name)
    return AliasPublic.of(gateway.registry.set_alias(name, body.targets))


@router.delete("/{name:path}", status_code=204)
async def delete_alias(name: str, gateway: GatewayDep) -> Response:
    gateway.registry.remove_alias(name)
    return Response(status_code=204)
