"""Per-request chat template and stop tokens on vLLM's Responses and Messages routes.

Runs inside a deltagate engine's API server (vLLM's `--middleware`). vLLM 0.32 takes a request's
`chat_template` on /v1/chat/completions only: /v1/responses and /v1/messages render with the
server's template, and the Messages request has no `stop_token_ids`. The gateway serves many
variants on one engine, each with its post model's template and end-of-turn tokens, so it sends
them in the body under `deltagate_chat`; this middleware takes that field out before vLLM parses
the request and makes the two handlers use it for this request only (a context variable, so
concurrent requests of other variants keep theirs). The renderer's template is the default of
every route, so a request that brought none (chat completions, or no variant) keeps the server's.
"""

from __future__ import annotations

import contextvars
import json
from dataclasses import dataclass

FIELD = "deltagate_chat"  # {"chat_template": str | None, "stop_token_ids": [int]}
PROBE = "/deltagate/chat"  # GET: 200 when an engine has this middleware (the gateway checks)
ROUTES = ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens")


@dataclass(frozen=True)
class VariantChat:
    chat_template: str | None
    stop_token_ids: tuple[int, ...]


_CURRENT: contextvars.ContextVar[VariantChat | None] = contextvars.ContextVar("deltagate_chat", default=None)


def _template(self) -> str | None:
    current = _CURRENT.get()
    return (current and current.chat_template) or self.__dict__.get("chat_template")


def _set_template(self, value: str | None) -> None:
    self.__dict__["chat_template"] = value


def _to_chat_request(cls_method):
    """Wrap Messages' conversion to a chat request: add the variant's template and stop tokens."""

    def convert(cls, *args, **kwargs):
        request = cls_method.__func__(cls, *args, **kwargs)
        current = _CURRENT.get()
        if current is not None:
            if current.chat_template:
                request.chat_template = current.chat_template
            stops = list(request.stop_token_ids or [])
            request.stop_token_ids = stops + [t for t in current.stop_token_ids if t not in stops]
        return request

    return classmethod(convert)


def _patch(handler) -> None:
    """Give one vLLM handler a per-request `chat_template` (a subclass: only this object changes)."""
    if handler is None or getattr(type(handler), "_deltagate", False):
        return
    attrs = {"_deltagate": True, "chat_template": property(_template, _set_template)}
    if hasattr(type(handler), "to_chat_completion_request"):  # Messages: converts to a chat request
        attrs["to_chat_completion_request"] = _to_chat_request(type(handler).to_chat_completion_request)
    template = handler.__dict__.get("chat_template")
    handler.__class__ = type(f"Deltagate{type(handler).__name__}", (type(handler),), attrs)
    handler.__dict__["chat_template"] = template


class VariantChatMiddleware:
    """ASGI middleware: take `deltagate_chat` out of the body of the routes above, apply it."""

    def __init__(self, app):
        self.app = app
        self._patched = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path == PROBE:
            return await send_json(send, 200, {"routes": list(ROUTES)})
        if path not in ROUTES or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if not self._patched:
            state = scope["app"].state
            for handler in (
                getattr(state, name, None)
                for name in ("openai_serving_responses", "anthropic_serving_messages")
            ):
                _patch(handler)
                _patch(getattr(handler, "online_renderer", None))  # renders Responses; shared by all routes
            self._patched = True
        body = await read_body(receive)
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        chat = request.pop(FIELD, None) if isinstance(request, dict) else None
        if chat is None:
            return await self.app(scope, _replay(body, receive), send)
        token = _CURRENT.set(VariantChat(chat.get("chat_template"), tuple(chat.get("stop_token_ids") or ())))
        try:
            await self.app(scope, _replay(json.dumps(request).encode(), receive), send)
        finally:
            _CURRENT.reset(token)


async def read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that gives `body` once, then the server's own (which reports a disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def send_json(send, status: int, obj: dict) -> None:
    raw = json.dumps(obj).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": raw})
