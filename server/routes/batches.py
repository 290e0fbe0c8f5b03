"""OpenAI's Batch API (`client.batches`): a JSONL file of requests over one or several variants."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict

from server.batches.service import BatchService
from server.deps import Caller, require_api_key
from server.routes.pages import After, Ided, cursor_page

router = APIRouter(prefix="/v1/batches", tags=["batches"], dependencies=[Depends(require_api_key)])


async def get_batches(request: Request) -> BatchService:
    return request.app.state.batches


BatchesDep = Annotated[BatchService, Depends(get_batches)]


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    output_expires_after: dict | None = None  # accepted; output files are kept until deleted


@router.post("")
async def create_batch(body: BatchCreate, service: BatchesDep, caller: Caller) -> dict:
    """Queue the file's requests; they run variant by variant (one swap each), `concurrency` at once,
    as the caller's own requests (its key's scopes; its project's files and batches only)."""
    return service.create(body.input_file_id, body.endpoint, body.completion_window, body.metadata, caller)


@router.get("")
async def list_batches(
    service: BatchesDep, caller: Caller, after: After = None, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict:
    return cursor_page([Ided(b) for b in service.list(caller.project or "")], after, limit, "desc")


@router.get("/{batch_id}")
async def get_batch(batch_id: str, service: BatchesDep, caller: Caller) -> dict:
    """Status, request counts, token usage, and the output and error files once done."""
    return service.get(batch_id, caller.project or "")


@router.post("/{batch_id}/cancel")
async def cancel_batch(batch_id: str, service: BatchesDep, caller: Caller) -> dict:
    return service.cancel(batch_id, caller.project or "")
