"""OpenAI-compatible inference routes; `model` names a variant (or a base)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response

from server.deps import GatewayDep, MetricsDep, require_api_key
from server.proxy import forward
from server.schemas import InferenceBody

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])
_STARTED = int(time.time())


@router.get("/models")
async def list_models(gateway: GatewayDep) -> dict:
    """Every servable model: each base and each variant."""
    data = [
        {"id": name, "object": "model", "created": _STARTED, "owned_by": "deltagate"}
        for name in gateway.model_names()
    ]
    return {"object": "list", "data": data}


@router.post("/completions")
async def completions(body: InferenceBody, gateway: GatewayDep, metrics: MetricsDep) -> Response:
    """Text completion on the named variant."""
    return await forward(gateway, metrics, "/v1/completions", body, chat=False)


@router.post("/chat/completions")
async def chat_completions(body: InferenceBody, gateway: GatewayDep, metrics: MetricsDep) -> Response:
    """Chat completion on the named variant, with its post model's chat template."""
    return await forward(gateway, metrics, "/v1/chat/completions", body, chat=True)
