"""Relay an OpenAI request to the engine holding its variant, streaming or not.

A request is resolved once (server/resolver.py) and admitted once (server/admission.py); the
admission is held for the whole response (for streams: until the last chunk is sent or the client
goes away), so a swap never starts under a running generation. The hot path is
per chunk: bytes from the engine are rewritten at byte level (server/rewrite.py) and passed on
without parsing JSON; per request, one JSON encode of the payload.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
from fastapi import Response

from loaders.engine import EngineError
from loaders.engine_chat import FIELD
from server.aliases import VARIANT_HEADER, sticky_key
from server.errors import BadRequestError, InvalidBodyError, NotFoundError, RateLimitError
from server.gateway import Gateway
from server.metrics import Metrics
from server.resolver import Target
from server.rewrite import StreamRewriter, rewrite_body
from server.schemas import InferenceBody, parse_inference_body
from server.stored import Stored
from server.streaming import RelayStream, StallWatch
from server.tenancy import ROOT, Principal

# W3C trace context: passed to the engine so its spans join the client's trace.
TRACE_HEADERS = ("traceparent", "tracestate")
ENGINE_HEADER = "X-Deltagate-Engine"  # which engine answered (one of several replicas of a base)
CLIENT_CLOSED = 499  # recorded (never sent) when the client went away mid-stream
JSON_HEADERS = {"Content-Type": "application/json"}
UNWATCHED = StallWatch(0)  # for callers that read the stream themselves (evals)


@dataclass(frozen=True)
class Route:
    """An engine route the relay forwards to, and what its requests can carry."""

    path: str
    chat: bool  # renders messages with a chat template
    template: bool  # takes the template as `chat_template` in the request (else: loaders/engine_chat.py)
    stops: bool  # takes `stop_token_ids`
    stream_usage: bool  # a stream reports usage only when asked (`stream_options.include_usage`)


COMPLETIONS = Route("/v1/completions", chat=False, template=False, stops=True, stream_usage=True)
CHAT = Route("/v1/chat/completions", chat=True, template=True, stops=True, stream_usage=True)
RESPONSES = Route("/v1/responses", chat=True, template=False, stops=True, stream_usage=False)
MESSAGES = Route("/v1/messages", chat=True, template=False, stops=False, stream_usage=False)
# The tokenizer routes need no stop tokens: `stops` so that they are not sent another way (then dropped).
COUNT_TOKENS = Route("/v1/messages/count_tokens", chat=True, template=False, stops=True, stream_usage=False)
TOKENIZE_CHAT = Route("/tokenize", chat=True, template=True, stops=True, stream_usage=False)
TOKENIZE_TEXT = Route("/tokenize", chat=False, template=False, stops=True, stream_usage=False)


def engine_payload(body: InferenceBody, target: Target, route: Route, variant_chat: bool = True) -> dict:
    """The request as the engine must see it: engine model name, the variant's template/stops."""
    payload = body.model_dump()
    for field in ("chat_template", FIELD):
        if payload.pop(field, None) is not None:
            raise BadRequestError(f"{field} is set per variant by its artifact; omit it")
    payload["model"] = target.engine_model
    stops = target.stop_token_ids
    if route.stops and stops:
        mine = list(payload.get("stop_token_ids") or [])
        payload["stop_token_ids"] = mine + [t for t in stops if t not in mine]
    template = target.chat_template if route.chat else None
    if route.template and template:
        payload["chat_template"] = template
    elif template or (stops and not route.stops):  # the engine takes them through loaders/engine_chat.py
        if not variant_chat:
            raise BadRequestError(
                f"{target.variant.name!r} has its own chat template or end-of-turn tokens, and its engine "
                f"cannot apply them on {route.path} (it was not started by deltagate); "
                "use /v1/chat/completions"
            )
        payload[FIELD] = {"chat_template": template, "stop_token_ids": [] if route.stops else stops}
    return payload


def _wants_usage(payload: dict) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


async def forward(
    gateway: Gateway,
    metrics: Metrics,
    body: InferenceBody,
    headers: Mapping[str, str],
    route: Route,
    *,
    watch: StallWatch = UNWATCHED,
    caller: Principal = ROOT,
    background: bool = False,
) -> Response:
    """Resolve (for `caller`), admit on the variant's weights (swapping if needed), call the engine,
    relay the answer. Background work (`background`, or a key of priority batch) yields to
    interactive requests: in the swap policy, and in the engine under --priority-scheduling."""
    start = time.perf_counter()
    target = gateway.resolve(
        body.model,
        sticky_key(headers, body.model_extra or {}),
        continued=_continued_variant(gateway, route, body),
        caller=caller,
    )
    variant, engine = target.variant.name, target.group
    answers_as = target.engine_model  # the model name in the engine's answers
    endpoint = route.path
    payload = engine_payload(body, target, route, gateway.variant_chat(target.group))
    keep_usage = _wants_usage(payload) or not route.stream_usage
    if body.stream and not keep_usage:  # ask for usage anyway (token metrics); the client won't see it
        payload["stream_options"] = {**(payload.get("stream_options") or {}), "include_usage": True}
    forwarded = {h: headers[h] for h in TRACE_HEADERS if h in headers}
    forwarded["Content-Type"] = "application/json"

    only = _stored_engine(gateway, route, payload, target)
    background = background or caller.priority == "batch"
    if gateway.settings.priority_scheduling:  # vLLM: lower is earlier; a client's own is not trusted
        payload["priority"] = int(background)
    try:
        grant = gateway.quotas.admit(caller.quotas())
    except RateLimitError:  # over one of the key's limits: counted, not sent
        metrics.observe_key(caller, variant, 429, None)
        raise
    try:
        async with gateway.admission(target, only=only, background=background) as admitted:
            try:
                upstream = await admitted.post(endpoint, payload, forwarded)
            except EngineError:
                metrics.observe_request(variant, endpoint, 502, time.perf_counter() - start)
                raise
            engine_id = admitted.engine_id  # the engine answering (metrics' `engine` label: its id)
            # x-ratelimit-* on every answer of a limited key
            served_by = {ENGINE_HEADER: engine_id, VARIANT_HEADER: variant, **grant.headers}
            remember = route is RESPONSES and gateway.responses.enabled and upstream.status == 200
            stored = Stored(engine_id, variant, answers_as) if remember else None
            metrics.swap_wait_seconds.labels(variant).observe(time.perf_counter() - start)
            released = False

            def release(status: int, usage: dict | None) -> None:
                nonlocal released
                if not released:
                    released = True
                    admitted.release()
                    metrics.observe_request(variant, endpoint, status, time.perf_counter() - start)
                    if target.alias is not None:
                        metrics.observe_alias(target.alias, variant, status)
                    if usage:
                        metrics.observe_usage(variant, usage)
                    metrics.observe_key(caller, variant, status, usage)
                    gateway.usage.add(caller, variant, usage)
                    grant.done(usage)

            if not body.stream or upstream.status != 200:
                status = upstream.status  # read before release()
                try:
                    raw = await upstream.read()
                except aiohttp.ClientError as exc:
                    metrics.upstream_errors.labels(engine_id, "stream").inc()
                    release(502, None)
                    raise EngineError(f"engine for {engine!r} broke off its answer: {exc}") from exc
                finally:
                    upstream.release()
                if status >= 400 and upstream.content_type != "application/json":  # not vLLM's own error
                    metrics.upstream_errors.labels(engine_id, "status").inc()
                    release(502, None)
                    raise EngineError(
                        f"engine for {engine!r} answered {status} on {endpoint} without a JSON error"
                    )
                if status >= 500:
                    metrics.upstream_errors.labels(engine_id, "status").inc()
                if remember:
                    gateway.responses.add(raw, stored)
                raw, usage = rewrite_body(raw, answers_as, body.model)
                release(status, usage)
                return Response(raw, status_code=status, media_type=upstream.content_type, headers=served_by)

            rewriter = StreamRewriter(answers_as, body.model, keep_usage=keep_usage)

            async def relay() -> AsyncIterator[bytes]:
                nonlocal remember
                status, first = CLIENT_CLOSED, True
                try:
                    while data := await upstream.content.readany():
                        if remember:  # until the first event (response.created) names the response
                            remember = not gateway.responses.add(data, stored)
                        out = rewriter.feed(data)
                        if out:
                            if first:
                                first = False
                                metrics.ttft_seconds.labels(variant).observe(time.perf_counter() - start)
                            yield out
                    if tail := rewriter.flush():
                        yield tail
                    status = 200
                except aiohttp.ClientError as exc:
                    status = 502
                    metrics.upstream_errors.labels(engine_id, "stream").inc()
                    yield error_event(f"engine for {engine!r} broke off the stream: {exc}")
                finally:
                    if status == 200:
                        upstream.release()
                    else:
                        upstream.close()  # the client left (or the engine broke): drop the connection
                    release(status, rewriter.usage)

            admitted.detach()  # released by the stream, when it ends
            stream = RelayStream(relay(), watch, variant)
            stream.headers.update(served_by)
            return stream
    except BaseException:
        grant.done(None)  # not admitted, or failed before its answer: its place in the limits is freed
        raise


def _continued_variant(gateway: Gateway, route: Route, body: InferenceBody) -> str | None:
    """A Responses request continuing a stored response: the variant that made it (an alias then
    serves it with that target while it still routes there)."""
    previous = (body.model_extra or {}).get("previous_response_id") if route is RESPONSES else None
    return gateway.responses.variant_of(previous) if isinstance(previous, str) else None


def _stored_engine(gateway: Gateway, route: Route, payload: dict, target: Target) -> str | None:
    """For a Responses request continuing a stored response: the engine holding it (and a 400 if
    it was made by another variant); None for any other request."""
    if route is not RESPONSES:
        return None
    if payload.get("background"):
        raise BadRequestError(
            "background responses are not served: deltagate holds a variant's weights on an engine only "
            "while its request is open; stream the response instead"
        )
    previous = payload.get("previous_response_id")
    if not previous:
        return None
    stored = gateway.responses.get(previous)
    if stored.variant != target.variant.name:
        raise BadRequestError(
            f"response {previous!r} was made by {stored.variant!r}; continue it with model {stored.variant!r}"
        )
    return stored.engine_id


async def stored_call(gateway: Gateway, response_id: str, action: str = "") -> Response:
    """GET a stored response (action "") or POST its `/cancel`, on the engine that made it; the
    answer names the variant that made it."""
    stored = gateway.responses.get(response_id)
    slot = gateway.slot(stored.engine_id)
    if slot is None:
        raise NotFoundError(f"the engine that made response {response_id!r} is gone")
    path = f"/v1/responses/{response_id}{action}"
    try:
        call = slot.client.relay.post(path) if action else slot.client.relay.get(path)
        async with call as upstream:
            raw, status = await upstream.read(), upstream.status
    except aiohttp.ClientError as exc:
        raise EngineError(f"engine {stored.engine_id!r} unreachable: {exc}") from exc
    raw, _ = rewrite_body(raw, stored.answers_as, stored.variant)
    headers = {ENGINE_HEADER: slot.id}
    return Response(raw, status_code=status, media_type="application/json", headers=headers)


async def tokenizer_call(gateway: Gateway, endpoint: str, raw: bytes, caller: Principal = ROOT) -> Response:
    """/tokenize or /detokenize for the named variant: its engine's tokenizer (the base's; that it
    equals the artifact's own is not checked yet, see README) and, for chat messages, the variant's
    chat template. Needs no weights, so it never waits for a swap. Without `model`, the only base."""
    try:
        request = json.loads(raw)
    except ValueError as exc:
        raise InvalidBodyError(f"body is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise InvalidBodyError("body must be a JSON object")
    request["model"] = request.get("model") or gateway.default_model()
    body = parse_inference_body(json.dumps(request).encode())
    target = gateway.resolve(body.model, caller=caller)
    route = TOKENIZE_CHAT if "messages" in request else TOKENIZE_TEXT
    route = COUNT_TOKENS if endpoint == COUNT_TOKENS.path else route
    client = gateway.any_slot(target).client  # no weights needed: any engine of the group
    payload = engine_payload(body, target, route, client.variant_chat)
    payload["model"] = target.group  # an adapter has its base's tokenizer
    payload.pop("stop_token_ids", None)  # a generation parameter; the tokenizer endpoints refuse it
    payload.pop("stream", None)
    try:
        async with client.relay.post(endpoint, data=json.dumps(payload), headers=JSON_HEADERS) as upstream:
            raw = await upstream.read()
            if upstream.status >= 400 and upstream.content_type != "application/json":
                raise EngineError(
                    f"engine for {client.served_name!r} answered {upstream.status} on {endpoint}"
                )
            return Response(raw, status_code=upstream.status, media_type=upstream.content_type)
    except aiohttp.ClientError as exc:
        raise EngineError(f"engine for {client.served_name!r} unreachable: {exc}") from exc


def error_event(message: str) -> bytes:
    """An SSE event carrying the error envelope: how a stream that breaks off ends."""
    error = {"error": {"message": message, "type": "engine_error", "code": 502}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"
