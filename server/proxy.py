"""Forward an OpenAI request to the engine holding its variant, streaming or not.

The slot admission is held for the whole response (for streams: until the last chunk
is sent or the client goes away), so a swap never starts under a running generation.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import Response
from fastapi.responses import JSONResponse, StreamingResponse

from loaders.engine import EngineError
from server.errors import BadRequestError
from server.gateway import Gateway, Resolved
from server.metrics import Metrics
from server.schemas import InferenceBody


def engine_payload(body: InferenceBody, target: Resolved, chat: bool) -> dict:
    """The request as the engine must see it: engine model name, the variant's template/stops."""
    payload = body.model_dump()
    if payload.pop("chat_template", None) is not None:
        raise BadRequestError("chat_template is set per variant by its artifact; omit it")
    payload["model"] = target.slot.client.served_name
    if chat and target.chat_template:
        payload["chat_template"] = target.chat_template
    if target.stop_token_ids:
        stops = list(payload.get("stop_token_ids") or [])
        payload["stop_token_ids"] = stops + [t for t in target.stop_token_ids if t not in stops]
    return payload


def _rename(obj: dict, model: str) -> dict:
    if isinstance(obj, dict) and "model" in obj:
        obj["model"] = model
    return obj


async def forward(
    gateway: Gateway, metrics: Metrics, endpoint: str, body: InferenceBody, *, chat: bool
) -> Response:
    """Admit on the variant's weights (swapping if needed), call the engine, relay the answer."""
    start = time.perf_counter()
    target = gateway.resolve(body.model)
    payload = engine_payload(body, target, chat)
    await target.slot.acquire(target.variant.name, target.recipe)
    metrics.inflight.inc()
    released = False

    async def release(status: int) -> None:
        nonlocal released
        if not released:
            released = True
            metrics.inflight.dec()
            await target.slot.release()
            metrics.requests.labels(body.model, endpoint, str(status)).inc()
            metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)

    http = target.slot.client.http
    try:
        request = http.build_request("POST", endpoint, json=payload)
        upstream = await http.send(request, stream=body.stream)
    except httpx.HTTPError as exc:
        await release(502)
        raise EngineError(f"engine unreachable: {exc}") from exc

    if not body.stream or upstream.status_code != 200:
        try:
            raw = await upstream.aread()
        finally:
            await upstream.aclose()
            await release(upstream.status_code)
        try:
            content = _rename(json.loads(raw), body.model)
        except json.JSONDecodeError:
            return Response(raw, status_code=upstream.status_code)
        return JSONResponse(content, status_code=upstream.status_code)

    async def relay() -> AsyncIterator[str]:
        try:
            async for line in upstream.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    line = "data: " + json.dumps(_rename(json.loads(line[6:]), body.model))
                yield line + "\n"
        finally:
            await upstream.aclose()
            await release(200)

    return StreamingResponse(relay(), media_type="text/event-stream")
