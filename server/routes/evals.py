"""Evaluation endpoints (admin): evals, their runs, results and graded items."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response

from server.deps import require_admin
from server.evals.schemas import EvalCreate, EvalPublic, OutputItems, RunCreate, RunPublic
from server.evals.service import EvalService

router = APIRouter(prefix="/v1/evals", tags=["evals"], dependencies=[Depends(require_admin)])


async def get_evals(request: Request) -> EvalService:
    return request.app.state.evals


EvalsDep = Annotated[EvalService, Depends(get_evals)]


def _public(service: EvalService, row: dict) -> EvalPublic:
    spec = EvalCreate.model_validate(row["body"])
    source = row["body"]["data_source"]
    if source["type"] == "jsonl":
        source = {"type": "jsonl"}  # the items themselves are not echoed back
    task = service.task_of(spec)
    criteria = [g.model_dump() for g in task.graders]
    return EvalPublic(
        id=row["id"],
        name=spec.name,
        created_at=int(row["created_at"]),
        data_source=source,
        testing_criteria=criteria,
        items=len(task.items),
    )


@router.post("", status_code=201)
async def create_eval(body: EvalCreate, service: EvalsDep) -> EvalPublic:
    """Define an eval: a data source (built-in task or JSONL items) and graders."""
    return _public(service, service.create_eval(body))


@router.get("")
async def list_evals(service: EvalsDep) -> dict:
    return {"object": "list", "data": [_public(service, row) for row in service.store.evals()]}


@router.get("/{eval_id}")
async def get_eval(eval_id: str, service: EvalsDep) -> EvalPublic:
    return _public(service, service.get_eval(eval_id))


@router.delete("/{eval_id}", status_code=204)
async def delete_eval(eval_id: str, service: EvalsDep) -> Response:
    service.delete_eval(eval_id)
    return Response(status_code=204)


@router.post("/{eval_id}/runs", status_code=201)
async def create_run(eval_id: str, body: RunCreate, service: EvalsDep) -> RunPublic:
    """Start a run on one variant or several (paired); answers at once, status `queued`."""
    return service.public_run(await service.create_run(eval_id, body))


@router.get("/{eval_id}/runs")
async def list_runs(eval_id: str, service: EvalsDep) -> dict:
    service.get_eval(eval_id)
    return {"object": "list", "data": [service.public_run(r) for r in service.store.runs(eval_id)]}


@router.get("/{eval_id}/runs/{run_id}")
async def get_run(eval_id: str, run_id: str, service: EvalsDep) -> RunPublic:
    """Status, progress, result counts, scores with 95% intervals, paired differences."""
    return service.public_run(service.get_run(eval_id, run_id))


@router.post("/{eval_id}/runs/{run_id}/cancel")
async def cancel_run(eval_id: str, run_id: str, service: EvalsDep) -> RunPublic:
    return service.public_run(service.cancel(eval_id, run_id))


@router.get("/{eval_id}/runs/{run_id}/output_items")
async def output_items(
    eval_id: str,
    run_id: str,
    service: EvalsDep,
    status: Literal["pass", "fail", "error"] | None = None,
    after: int = Query(-1, description="the last id of the previous page"),
    limit: int = Query(50, ge=1, le=500),
) -> OutputItems:
    """Graded items: input, output, grade per criterion; filter by status."""
    service.get_run(eval_id, run_id)
    return service.output_items(run_id, status, after, limit)
