"""OpenAI-compatible inference routes; `model` names a variant (or a base)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request, Response

from server.deps import Caller, GatewayDep, check_api_key, credential, require_api_key
from server.gateway import Gateway
from server.proxy import (
    CHAT,
    COMPLETIONS,
    COUNT_TOKENS,
    MESSAGES,
    RESPONSES,
    Route,
    forward,
    stored_call,
    tokenizer_call,
)
from server.registry import unknown_model
from server.schemas import InferenceBody, parse_inference_body
from server.tenancy import Principal

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])
_STARTED = int(time.time())
# The inference routes take the raw request: FastAPI's dependency solving and body handling
# cost about half of the gateway's per-request CPU (measured with py-spy under bench/relay.py
# load). The body schema is still published, for clients and schema-driven tests.
_BODY_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": InferenceBody.model_json_schema()}},
    }
}


def _model(gateway: Gateway, name: str, caller: Principal) -> dict:
    """One model as OpenAI lists it, and the base it is served on (a base: itself); an alias also
    lists its targets' shares (`base`: its first target's). 404 if `caller` may not use it."""
    state = gateway.registry.snapshot(name)
    alias, base = state.aliases.get(name), state.base_of(name)
    if not caller.may_use(name, base):
        raise unknown_model(name)
    if alias is None:
        return {"id": name, "object": "model", "created": _STARTED, "owned_by": "deltagate", "base": base}
    return {
        "id": name,
        "object": "model",
        "created": int(alias.updated_at),
        "owned_by": "deltagate",
        "base": base,
        "alias_of": alias.split(),
    }


@router.get("/models")
async def list_models(gateway: GatewayDep, caller: Caller) -> dict:
    """Every servable model the caller may use: bases, variants, aliases."""
    return {"object": "list", "data": [_model(gateway, name, caller) for name in gateway.model_names(caller)]}


@router.get("/models/{model:path}")
async def retrieve_model(gateway: GatewayDep, caller: Caller, model: str) -> dict:
    """One model (a base, a variant or an alias); 404 for a name the gateway does not serve."""
    return _model(gateway, model, caller)


inference = APIRouter(prefix="/v1", tags=["openai"])


@inference.post("/completions", openapi_extra=_BODY_SCHEMA)
async def completions(request: Request) -> Response:
    """Text completion on the named variant."""
    return await _forward(request, COMPLETIONS)


@inference.post("/chat/completions", openapi_extra=_BODY_SCHEMA)
async def chat_completions(request: Request) -> Response:
    """Chat completion on the named variant, with its post model's chat template."""
    return await _forward(request, CHAT)


@inference.post("/responses", openapi_extra=_BODY_SCHEMA)
async def responses(request: Request) -> Response:
    """OpenAI Responses API on the named variant, with its chat template; `previous_response_id`
    continues a stored response on the engine and variant that made it (serve --responses-store)."""
    return await _forward(request, RESPONSES)


@router.get("/responses/{response_id}")
async def retrieve_response(gateway: GatewayDep, response_id: str) -> Response:
    """A stored response (serve --responses-store), from the engine that made it."""
    return await stored_call(gateway, response_id)


@router.post("/responses/{response_id}/cancel")
async def cancel_response(gateway: GatewayDep, response_id: str) -> Response:
    """Cancel a stored response on the engine that made it (vLLM: background responses only)."""
    return await stored_call(gateway, response_id, "/cancel")


@inference.post("/messages", openapi_extra=_BODY_SCHEMA)
async def messages(request: Request) -> Response:
    """Anthropic Messages API on the named variant, with its chat template and end-of-turn tokens."""
    return await _forward(request, MESSAGES)


@inference.post("/messages/count_tokens", openapi_extra=_BODY_SCHEMA)
async def count_tokens(request: Request) -> Response:
    """Anthropic's token count of a Messages request, with the variant's chat template."""
    gateway: Gateway = request.app.state.gateway
    caller = check_api_key(gateway, credential(request.headers))
    return await tokenizer_call(gateway, COUNT_TOKENS.path, await request.body(), caller)


async def _forward(request: Request, route: Route) -> Response:
    gateway: Gateway = request.app.state.gateway
    caller = check_api_key(gateway, credential(request.headers))
    body = parse_inference_body(await request.body())
    state = request.app.state
    return await forward(
        gateway, state.metrics, body, request.headers, route, watch=state.streams, caller=caller
    )


# vLLM serves these at the root, and clients (lm-eval's remote tokenizer) call them there.
tokenizer = APIRouter(tags=["tokenizer"])
_TOKENIZE_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "model": {"type": "string"},
                        "prompt": {"type": "string"},
                        "messages": {"type": "array"},
                        "add_special_tokens": {"type": "boolean"},
                    },
                }
            }
        },
    }
}
_DETOKENIZE_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["tokens"],
                    "properties": {
                        "model": {"type": "string"},
                        "tokens": {"type": "array", "items": {"type": "integer"}},
                    },
                }
            }
        },
    }
}


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
    caller = check_api_key(gateway, credential(request.headers))
    return await tokenizer_call(gateway, endpoint, await request.body(), caller)
