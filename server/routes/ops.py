"""Operations: health and Prometheus metrics (the gateway's and each engine's)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response

from server.deps import GatewayDep, MetricsDep
from server.errors import NotFoundError
from server.metrics import lora_requests_info

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
