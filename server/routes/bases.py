"""Admin: register, list and delete bases while serving (ParamΔ: an updated base for old deltas); a
project's admin key, runtime bases under its project's prefix."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from server.deps import AdminCaller, GatewayDep, require_admin
from server.gateway import Gateway
from server.schemas import BaseCreate, BasePublic, BasesPublic, SwapPublic

router = APIRouter(prefix="/v1/bases", tags=["admin"], dependencies=[Depends(require_admin)])


def _public(gateway: Gateway, name: str) -> BasePublic:
    record = gateway.registry.base(name)
    slot = gateway.slot_of(name)
    swaps = [SwapPublic.model_validate(s, from_attributes=True) for s in slot.recent_swaps] if slot else []
    return BasePublic(
        name=record.name,
        path=record.path,
        tool_parser=record.tool_parser,
        group=record.group,
        runtime=record.runtime,
        state=gateway.base_state(name),
        architecture=record.architecture,
        content_hash=record.content_hash,
        engine_url=slot.client.url if slot else "",
        resident_variant=slot.last_admitted if slot else None,
        inflight=slot.inflight if slot else 0,
        last_swap_seconds=slot.last_swap.seconds if slot and slot.last_swap else None,
        recent_swaps=swaps,
        swap_memory=slot.memory if slot else {},
    )


@router.post("", status_code=201)
async def create_base(body: BaseCreate, gateway: GatewayDep) -> BasePublic:
    """Check the checkpoint (config, tensors, dtypes, tokenizer), then serve it: hot-loaded by a
    running engine whose base it matches in architecture, config, shapes and dtypes, else (managed
    engines) on an engine of its own, answering 503 until that engine is ready."""
    await gateway.add_base(body.name, body.path, body.tool_parser)
    return _public(gateway, body.name)


@router.get("")
async def list_bases(gateway: GatewayDep, caller: AdminCaller) -> BasesPublic:
    """Bases with their engine, resident variant, requests in flight and recent swaps (a project's
    admin key: its project's runtime bases)."""
    names = [n for n in gateway.registry.state.bases if caller.may_manage(n)]
    return BasesPublic(data=[_public(gateway, n) for n in names])


@router.get("/{name:path}")
async def get_base(name: str, gateway: GatewayDep) -> BasePublic:
    return _public(gateway, name)


@router.delete("/{name:path}", status_code=204)
async def delete_base(name: str, gateway: GatewayDep) -> Response:
    """Forget a runtime base; 409 while a variant uses it."""
    await gateway.delete_base(name)
    return Response(status_code=204)
