"""Operations: health and Prometheus metrics (the gateway's and each engine's)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response

from server.deps import GatewayDep, MetricsDep, require_admin
from server.errors import NotFoundError
from server.metrics import lora_requests_info
from server.schemas import EnginePublic, EnginesPublic

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


@router.get("/metrics/engines/{engine:path}")
async def engine_metrics(engine: str, gateway: GatewayDep) -> Response:
    """The vLLM engine's own metrics (vllm:*), relayed: engines bind to loopback, unscrapable; plus
    `vllm:lora_requests_info` with the resident variant as the running adapter. `engine`: an engine
    id (GET /v1/engines), or a base (its first engine)."""
    slot = gateway.slots.get(engine) or next(iter(gateway.group(engine)), None)
    if slot is None:
        raise NotFoundError(f"no engine {engine!r}; engines: {sorted(gateway.slots)}")
    text = await slot.client.metrics_text()
    if "vllm:lora_requests_info" not in text:  # an engine without --enable-lora: say what the slot holds
        resident = next(s.resident for s in gateway.engine_states() if s.id == slot.id)
        text += lora_requests_info([(resident, slot.queued(), {})], time.time())
    return Response(text, media_type=PROMETHEUS_TEXT)


@router.get("/v1/engines", dependencies=[Depends(require_admin)], tags=["admin"])
async def engines(gateway: GatewayDep) -> EnginesPublic:
    """Every engine that is up: its base, where it runs, what it holds, its load and swaps."""
    data = []
    for state in gateway.engine_states():
        slot = gateway.slots[state.id]
        endpoint = gateway.endpoint_of(slot)
        data.append(
            EnginePublic(
                id=slot.id,
                base=slot.group,
                url=slot.client.url,
                node=endpoint.node if endpoint else "",
                pid=endpoint.pid if endpoint else None,
                resident_variant=state.resident,
                inflight=state.inflight,
                queued=state.queued,
                swaps=len(slot.recent_swaps),
            )
        )
    return EnginesPublic(data=data)
