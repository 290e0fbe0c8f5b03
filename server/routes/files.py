"""OpenAI's Files API (`client.files`), for batch input and output files."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile

from server.batches.store import FileStore
from server.deps import Caller, require_api_key
from server.errors import BadRequestError
from server.routes.pages import After, Ided, cursor_page

router = APIRouter(prefix="/v1/files", tags=["batches"], dependencies=[Depends(require_api_key)])


async def get_files(request: Request) -> FileStore:
    return request.app.state.files


FilesDep = Annotated[FileStore, Depends(get_files)]


@router.post("")
async def upload_file(
    store: FilesDep, caller: Caller, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> dict:
    """Upload a JSONL file of batch requests (`purpose`: batch), up to the gateway's body limit."""
    if purpose != "batch":
        raise BadRequestError(f"purpose {purpose!r}: this gateway keeps files for batches ('batch')")
    return store.add(await file.read(), file.filename or "upload.jsonl", purpose, caller.project or "")


@router.get("")
async def list_files(
    store: FilesDep,
    caller: Caller,
    purpose: str | None = None,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    return cursor_page([Ided(f) for f in store.list(purpose, caller.project or "")], after, limit, order)


@router.get("/{file_id}")
async def get_file(file_id: str, store: FilesDep, caller: Caller) -> dict:
    return store.get(file_id, caller.project or "")


@router.get("/{file_id}/content")
async def file_content(file_id: str, store: FilesDep, caller: Caller) -> Response:
    """The file's bytes (a batch's output or error file: JSONL, one answer per line)."""
    return Response(store.content(file_id, caller.project or ""), media_type="application/jsonl")


@router.delete("/{file_id}")
async def delete_file(file_id: str, store: FilesDep, caller: Caller) -> dict:
    store.delete(file_id, caller.project or "")
    return {"id": file_id, "object": "file", "deleted": True}
