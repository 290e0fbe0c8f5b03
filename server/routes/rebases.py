"""Admin: rebases — move variants of a base to an updated base, gated by an eval, promoted by aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server.deps import AdminCaller, require_admin
from server.rebase.schemas import RebaseCreate, RebasePublic, RebasesPublic
from server.rebase.service import RebaseService

router = APIRouter(prefix="/v1/rebases", tags=["admin"], dependencies=[Depends(require_admin)])


async def get_rebases(request: Request) -> RebaseService:
    return request.app.state.rebases


RebasesDep = Annotated[RebaseService, Depends(get_rebases)]


@router.post("", status_code=201)
async def create_rebase(body: RebaseCreate, service: RebasesDep, caller: AdminCaller) -> RebasePublic:
    """Queue a rebase (checked first: bases, variants, the eval, its criterion, the splits, names); a
    project's admin key rebases its own variants."""
    return service.create(body, caller)


@router.get("")
async def list_rebases(service: RebasesDep, caller: AdminCaller) -> RebasesPublic:
    """The rebases the caller may see (a project admin key: its project's)."""
    rows = [row for row in service.store.all() if caller.owns(row["project"])]
    return RebasesPublic(data=[service.public(row) for row in rows])


@router.get("/{rebase_id}")
async def get_rebase(rebase_id: str, service: RebasesDep, caller: AdminCaller) -> RebasePublic:
    """Status, progress and the report so far."""
    return service.public(service.get(rebase_id, caller))


@router.post("/{rebase_id}/cancel")
async def cancel_rebase(rebase_id: str, service: RebasesDep, caller: AdminCaller) -> RebasePublic:
    """Stop it; aliases it moved go back to their targets before it."""
    return service.cancel(rebase_id, caller)
