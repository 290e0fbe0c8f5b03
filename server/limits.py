"""Request size limits, enforced before a body is read into memory.

Every body except an artifact upload is bounded by `max_body_bytes` (a declared Content-Length
over the limit is refused before reading; a chunked body is counted as it arrives). Uploads are
bounded by `max_upload_bytes` and an idle timeout where they are streamed to disk (gateway).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import GatewayError, error_response


class PayloadTooLargeError(GatewayError):
    status, kind = 413, "payload_too_large"


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over `limit` bytes, except routes that stream to disk."""

    def __init__(self, app: ASGIApp, limit: int, streamed: frozenset[str] = frozenset({"/v1/deltas"})):
        self.app, self.limit, self.streamed = app, limit, streamed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.limit <= 0 or scope["path"] in self.streamed:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, "payload_too_large", self._message())
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise PayloadTooLargeError(self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"request body over the gateway's limit of {self.limit} bytes (serve --max-body-bytes)"
