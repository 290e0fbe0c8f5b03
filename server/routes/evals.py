"""Evaluation endpoints (admin): evals, their runs, results and graded items — OpenAI's Evals API
paths and shapes (the `openai` SDK's `client.evals`), with deltagate's sources as extras."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request

from server.deps import AdminCaller, require_admin
from server.evals.schemas import EvalCreate, EvalPublic, OutputItem, OutputItems, RunCreate, RunPublic
from server.evals.service import EvalService
from server.routes.pages import After, cursor_page

router = APIRouter(prefix="/v1/evals", tags=["evals"], dependencies=[Depends(require_admin)])


async def get_evals(request: Request) -> EvalService:
    return request.app.state.evals


EvalsDep = Annotated[EvalService, Depends(get_evals)]
Limit = Annotated[int, Query(ge=1, le=500)]
Order = Annotated[Literal["asc", "desc"], Query()]


def _public(service: EvalService, row: dict) -> EvalPublic:
    spec = EvalCreate.model_validate(row["body"])
    source = row["body"].get("data_source")
    if source and source["type"] == "jsonl":
        source = {"type": "jsonl"}  # the items themselves are not echoed back
    task = service.task_of(spec)
    config = spec.data_source_config
    return EvalPublic(
        id=row["id"],
        name=spec.name,
        created_at=int(row["created_at"]),
        data_source_config=config.public() if config else None,
        data_source=source,
        testing_criteria=[g.model_dump() for g in task.graders],
        items=len(task.items),
        metadata=spec.metadata,
    )


@router.post("", status_code=201)
async def create_eval(body: EvalCreate, service: EvalsDep, caller: AdminCaller) -> EvalPublic:
    """Define an eval: graders, and OpenAI's custom data source config (items with each run) or a
    data source of deltagate's (a built-in task, JSONL items, ...)."""
    return _public(service, service.create_eval(body, caller))


@router.get("")
async def list_evals(
    service: EvalsDep, caller: AdminCaller, after: After = None, limit: Limit = 20, order: Order = "asc"
) -> dict:
    """The evals the caller may see (a project admin key: its project's)."""
    rows = [row for row in service.store.evals() if caller.owns(row["project"])]
    return cursor_page([_public(service, row) for row in rows], after, limit, order)


@router.get("/{eval_id}")
async def get_eval(eval_id: str, service: EvalsDep, caller: AdminCaller) -> EvalPublic:
    return _public(service, service.get_eval(eval_id, caller))


@router.delete("/{eval_id}")
async def delete_eval(eval_id: str, service: EvalsDep, caller: AdminCaller) -> dict:
    """Delete an eval and its runs (409 while one runs)."""
    service.delete_eval(eval_id, caller)
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


@router.post("/{eval_id}/runs", status_code=201)
async def create_run(eval_id: str, body: RunCreate, service: EvalsDep, caller: AdminCaller) -> RunPublic:
    """Start a run on one variant or several (paired), each in the caller's scopes; answers at once,
    status `queued`."""
    return service.public_run(await service.create_run(eval_id, body, caller))


@router.get("/{eval_id}/runs")
async def list_runs(
    eval_id: str,
    service: EvalsDep,
    caller: AdminCaller,
    after: After = None,
    limit: Limit = 20,
    order: Order = "asc",
    status: Literal["queued", "in_progress", "completed", "canceled", "failed"] | None = None,
) -> dict:
    service.get_eval(eval_id, caller)
    runs = [service.public_run(r) for r in service.store.runs(eval_id) if status in (None, r["status"])]
    return cursor_page(runs, after, limit, order)


@router.get("/{eval_id}/runs/{run_id}")
async def get_run(eval_id: str, run_id: str, service: EvalsDep, caller: AdminCaller) -> RunPublic:
    """Status, progress, result counts, scores with 95% intervals, paired differences."""
    return service.public_run(service.get_run(eval_id, run_id, caller))


@router.delete("/{eval_id}/runs/{run_id}")
async def delete_run(eval_id: str, run_id: str, service: EvalsDep, caller: AdminCaller) -> dict:
    service.delete_run(eval_id, run_id, caller)
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


@router.post("/{eval_id}/runs/{run_id}/cancel")
async def cancel_run(eval_id: str, run_id: str, service: EvalsDep, caller: AdminCaller) -> RunPublic:
    return service.public_run(service.cancel(eval_id, run_id, caller))


@router.get("/{eval_id}/runs/{run_id}/output_items")
async def output_items(
    eval_id: str,
    run_id: str,
    service: EvalsDep,
    caller: AdminCaller,
    status: Literal["pass", "fail", "error"] | None = None,
    after: int = Query(-1, description="the last id of the previous page"),
    limit: int = Query(50, ge=1, le=500),
) -> OutputItems:
    """Graded items: the item, the sample (messages and answer), each grader's result."""
    return service.output_items(service.get_run(eval_id, run_id, caller), status, after, limit)


@router.get("/{eval_id}/runs/{run_id}/output_items/{item_id}")
async def output_item(
    eval_id: str, run_id: str, item_id: str, service: EvalsDep, caller: AdminCaller
) -> OutputItem:
    return service.output_item(service.get_run(eval_id, run_id, caller), item_id)
