"""Operations: health, Prometheus metrics, and the bases with their engines (admin)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from server.deps import GatewayDep, MetricsDep, require_admin
from server.schemas import BasePublic, BasesPublic

router = APIRouter(tags=["ops"])


@router.get("/health")
async def health(gateway: GatewayDep) -> dict:
    """200 with per-base engine health."""
    engines = {name: await slot.client.healthy() for name, slot in gateway.slots.items()}
    return {"status": "ok" if all(engines.values()) else "degraded", "engines": engines}


@router.get("/metrics")
async def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/bases", dependencies=[Depends(require_admin)], tags=["admin"])
async def list_bases(gateway: GatewayDep) -> BasesPublic:
    data = []
    for record in gateway.registry.state.bases.values():
        slot = gateway.slots.get(record.name)
        data.append(
            BasePublic(
                name=record.name,
                path=record.path,
                engine_url=slot.client.url if slot else "",
                resident_variant=slot.resident_variant if slot else None,
                inflight=slot.inflight if slot else 0,
                last_swap_seconds=slot.last_swap.seconds if slot and slot.last_swap else None,
            )
        )
    return BasesPublic(data=data)
