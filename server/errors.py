"""Typed gateway errors and the one error envelope every failure is returned in."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltas import DeltaError, IncompatibleError, InvalidArtifactError
from deltas.errors import CodecError, MergeMethodError
from deltas.store import ArtifactMissingError, StoreError
from loaders.engine import EngineError


class GatewayError(Exception):
    """Base of errors the gateway raises on purpose; carries its HTTP status."""

    status = 500
    kind = "internal_error"


class NotFoundError(GatewayError):
    status, kind = 404, "not_found"


class ConflictError(GatewayError):
    status, kind = 409, "conflict"


class BadRequestError(GatewayError):
    status, kind = 400, "invalid_request_error"


class ForbiddenError(GatewayError):
    status, kind = 403, "permission_error"


class UnauthorizedError(GatewayError):
    status, kind = 401, "authentication_error"


class InvalidBodyError(GatewayError):
    status, kind = 422, "invalid_request_error"


class SwapError(GatewayError):
    status, kind = 502, "swap_failed"


class RequestTimeoutError(GatewayError):
    status, kind = 408, "request_timeout"


class InsufficientStorageError(GatewayError):
    status, kind = 507, "insufficient_storage"


class UnavailableError(GatewayError):
    """Not servable yet (an engine starting): answered 503 with Retry-After."""

    status, kind = 503, "unavailable"


class RateLimitError(GatewayError):
    """A key over one of its limits: 429 with Retry-After and the x-ratelimit-* headers."""

    status, kind = 429, "rate_limit_exceeded"

    def __init__(self, message: str, headers: dict[str, str]):
        super().__init__(message)
        self.headers = headers


class EngineGoneError(UnavailableError):
    """The engine a request was about to be admitted on left the pool (died, or was scaled down):
    the request goes to another engine; answered 503 only if it ever escapes."""


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int


class ErrorResponse(BaseModel):
    """OpenAI-style error envelope: {"error": {"message", "type", "code"}}."""

    error: ErrorBody


def error_response(status: int, kind: str, message: str) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, code=status))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    if status == 503:
        headers = {"Retry-After": "10"}
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# The artifact library's errors (deltas/ knows no HTTP): status and type of each, the most specific
# class first. DeltaError itself, the family's base, is a bad artifact or recipe the client sent.
DELTA_ERRORS: tuple[tuple[type[DeltaError], int, str], ...] = (
    (ArtifactMissingError, 404, "not_found"),
    (StoreError, 502, "artifact_store_error"),  # upstream: unreachable, or it returned wrong bytes
    (InvalidArtifactError, 422, "invalid_artifact"),
    (IncompatibleError, 422, "incompatible_delta"),
    (CodecError, 422, "invalid_codec"),
    (MergeMethodError, 422, "invalid_merge_method"),
    (DeltaError, 422, "invalid_delta"),
)


def install_error_handlers(app: FastAPI, hide: str | None = None) -> None:
    """Map typed exceptions to HTTP codes, all in the ErrorResponse envelope.

    `hide`: the state dir's absolute path, shown to clients as `$STATE_DIR` (uploads, logs and
    the registry live there; a client has no business knowing where).
    """

    def text(exc: Exception) -> str:
        message = str(exc)
        return message.replace(hide, "$STATE_DIR") if hide else message

    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> JSONResponse:
        response = error_response(exc.status, exc.kind, text(exc))
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    @app.exception_handler(DeltaError)
    async def _delta(_: Request, exc: DeltaError) -> JSONResponse:
        status, kind = next((s, k) for cls, s, k in DELTA_ERRORS if isinstance(exc, cls))
        return error_response(status, kind, text(exc))

    @app.exception_handler(EngineError)
    async def _engine(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(502, "engine_error", text(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's and FastAPI's own errors (unknown route, wrong method, unparsable body), in
        the one envelope; FastAPI turns any error while reading a body into a 400, so a body over
        the limit (server/limits.py) is found as its cause."""
        if isinstance(exc.__cause__, GatewayError):
            return error_response(exc.__cause__.status, exc.__cause__.kind, text(exc.__cause__))
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        response = error_response(exc.status_code, kind, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(422, "invalid_request_error", "; ".join(parts))
