"""Admin: define, list and delete variants (base + Σ alpha·delta)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Response

from loaders.engine import EngineError
from server.deps import AdminCaller, GatewayDep, require_admin
from server.errors import NotFoundError, UnavailableError
from server.gateway import Gateway
from server.registry import VariantRecord
from server.schemas import VariantCreate, VariantPublic, VariantsPublic, VariantTermPublic, VariantWarmPublic

log = logging.getLogger("deltagate.variants")
router = APIRouter(prefix="/v1/variants", tags=["admin"], dependencies=[Depends(require_admin)])


def _public(gateway: Gateway, name: str) -> VariantPublic:
    record = gateway.registry.variant(name)
    slot = gateway.slot_of(record.base)
    lane, note = gateway.resolver.lane(name)
    if lane == "adapter":  # served beside the plain base: "resident" while the base is
        resident = bool(slot and slot.last_admitted == record.base)
    else:
        resident = bool(slot and slot.last_admitted == name)
    terms = [
        VariantTermPublic(**t.model_dump(), provenance=gateway.provenance(t.delta, record.base))
        for t in record.deltas
    ]
    fields = record.model_dump(exclude={"deltas"})
    return VariantPublic(**fields, deltas=terms, resident=resident, serving_lane=lane, lane_note=note)


@router.post("", status_code=201)
async def create_variant(body: VariantCreate, gateway: GatewayDep) -> VariantPublic:
    """Check the deltas fit the base (names, shapes, architecture), register, and (--warm-on-register)
    have its engines read its inputs into memory, so its first swap does not."""
    await gateway.catalog.define_variant(VariantRecord(**body.model_dump()))
    if not gateway.settings.warm_on_register:
        return _public(gateway, body.name)
    try:
        await gateway.warm(body.name)
    except (
        EngineError,
        UnavailableError,
        NotFoundError,
    ) as exc:  # registered all the same: its first swap reads them
        log.warning("could not warm %s: %s", body.name, exc)
    return _public(gateway, body.name)


@router.post("/{name:path}/warm", status_code=202)
async def warm_variant(name: str, gateway: GatewayDep, pin: bool | None = None) -> VariantWarmPublic:
    """Read the variant's inputs (base tensors, decoded deltas) into its engines' memory in the
    background, ahead of its first swap; `pin=true` keeps its decoded deltas whatever the delta
    cache's budget (least recently used unpinned ones are evicted first; `memory.evicted` names
    them), `pin=false` lets them go. GET /v1/bases shows what is held (`swap_memory`)."""
    return VariantWarmPublic(variant=name, engines=await gateway.warm(name, pin))


@router.get("")
async def list_variants(gateway: GatewayDep, caller: AdminCaller) -> VariantsPublic:
    """Every variant (a project's admin key: its project's)."""
    names = [n for n in gateway.registry.state.variants if caller.may_manage(n)]
    return VariantsPublic(data=[_public(gateway, n) for n in names])


@router.get("/{name:path}")
async def get_variant(name: str, gateway: GatewayDep) -> VariantPublic:
    return _public(gateway, name)


@router.delete("/{name:path}", status_code=204)
async def delete_variant(name: str, gateway: GatewayDep) -> Response:
    await gateway.catalog.delete_variant(name)
    return Response(status_code=204)
