"""OpenAI-compatible inference routes; `model` names a variant (or a base)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request, Response

from server.deps import GatewayDep, check_api_key, require_api_key
from server.gateway import Gateway
from server.proxy import forward, tokenizer_call
from server.schemas import InferenceBody, parse_inference_body

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])
_STARTED = int(time.time())
# The inference routes take the raw request: FastAPI's dependency solving and body handling
# cost about half of the gateway's per-request CPU (measured with py-spy under bench/relay.py
# load). The body schema is still published, for clients and schema-driven tests.
_BODY_SCHEMA = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": InferenceBody.model_json_schema()}}}}  # fmt: skip


@router.get("/models")
async def list_models(gateway: GatewayDep) -> dict:
    """Every servable model: each base and each variant."""
    data = [
        {"id": name, "object": "model", "created": _STARTED, "owned_by": "deltagate"}
        for name in gateway.model_names()
    ]
    return {"object": "list", "data": data}


inference = APIRouter(prefix="/v1", tags=["openai"])


@inference.post("/completions", openapi_extra=_BODY_SCHEMA)
async def completions(request: Request) -> Response:
    """Text completion on the named variant."""
    return await _forward(request, "/v1/completions", chat=False)


@inference.post("/chat/completions", openapi_extra=_BODY_SCHEMA)
async def chat_completions(request: Request) -> Response:
    """Chat completion on the named variant, with its post model's chat template."""
    return await _forward(request, "/v1/chat/completions", chat=True)


async def _forward(request: Request, endpoint: str, *, chat: bool) -> Response:
    gateway: Gateway = request.app.state.gateway
    check_api_key(gateway, request.headers.get("authorization"))
    body = parse_inference_body(await request.body())
    state = request.app.state
    return await forward(
        gateway, state.metrics, endpoint, body, request.headers, chat=chat, watch=state.streams
    )


# vLLM serves these at the root, and clients (lm-eval's remote tokenizer) call them there.
tokenizer = APIRouter(tags=["tokenizer"])
_TOKENIZE_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"model": {"type": "string"}, "prompt": {"type": "string"},
    "messages": {"type": "array"}, "add_special_tokens": {"type": "boolean"}}}}}}}  # fmt: skip
_DETOKENIZE_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["tokens"], "properties": {"model": {"type": "string"},
    "tokens": {"type": "array", "items": {"type": "integer"}}}}}}}}  # fmt: skip


@tokenizer.post("/tokenize", openapi_extra=_TOKENIZE_SCHEMA)
async def tokenize(request: Request) -> Response:
    """Token ids of a prompt (or chat messages, with the variant's template), as the variant sees it."""
    return await _tokenizer(request, "/tokenize")


@tokenizer.post("/detokenize", openapi_extra=_DETOKENIZE_SCHEMA)
async def detokenize(request: Request) -> Response:
    """Text of token ids, with the variant's tokenizer."""
    return await _tokenizer(request, "/detokenize")


async def _tokenizer(request: Request, endpoint: str) -> Response:
    gateway: Gateway = request.app.state.gateway
    check_api_key(gateway, request.headers.get("authorization"))
    return await tokenizer_call(gateway, endpoint, await request.body())
