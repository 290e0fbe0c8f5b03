"""Operations: health, Prometheus metrics (the gateway's and each engine's), and the bases (admin)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response

from server.deps import GatewayDep, MetricsDep, require_admin
from server.errors import NotFoundError
from server.metrics import lora_requests_info
from server.schemas import BasePublic, BasesPublic, SwapPublic

router = APIRouter(tags=["ops"])
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/health")
async def health(gateway: GatewayDep) -> dict:
    """200 with per-base engine health."""
    engines = {name: await slot.client.healthy() for name, slot in gateway.slots.items()}
    return {"status": "ok" if all(engines.values()) else "degraded", "engines": engines}


@router.get("/metrics")
async def metrics(m: MetricsDep) -> Response:
    """The gateway's own metrics (deltagate_*)."""
    return Response(m.render(), media_type=PROMETHEUS_TEXT)


@router.get("/metrics/engines/{base}")
async def engine_metrics(base: str, gateway: GatewayDep) -> Response:
    """The vLLM engine's own metrics (vllm:*), relayed: engines bind to loopback, unscrapable; plus
    `vllm:lora_requests_info` with the resident variant as the running adapter."""
    slot = gateway.slots.get(base)
    if slot is None:
        raise NotFoundError(f"no engine for base {base!r}; bases: {sorted(gateway.slots)}")
    text = await slot.client.metrics_text()
    if "vllm:lora_requests_info" not in text:  # an engine without --enable-lora: say what the slot holds
        resident = next(s.resident for s in gateway.engine_states() if s.engine == base)
        text += lora_requests_info([(resident, slot.queued(), {})], time.time())
    return Response(text, media_type=PROMETHEUS_TEXT)


@router.get("/v1/bases", dependencies=[Depends(require_admin)], tags=["admin"])
async def list_bases(gateway: GatewayDep) -> BasesPublic:
    """Bases with their engine, resident variant, requests in flight and recent swaps."""
    data = []
    for record in gateway.registry.state.bases.values():
        slot = gateway.slots.get(record.name)
        swaps = (
            [SwapPublic.model_validate(s, from_attributes=True) for s in slot.recent_swaps] if slot else []
        )
        data.append(
            BasePublic(
                name=record.name,
                path=record.path,
                engine_url=slot.client.url if slot else "",
                resident_variant=slot.resident_variant if slot else None,
                inflight=slot.inflight if slot else 0,
                last_swap_seconds=slot.last_swap.seconds if slot and slot.last_swap else None,
                recent_swaps=swaps,
            )
        )
    return BasesPublic(data=data)
