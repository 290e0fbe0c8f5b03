"""Admin: tokens and requests per project, key and model over a time range (root: every project; a
project's admin key: its own)."""

from __future__ import annotations

import time
from datetime import datetime

from fastapi import APIRouter, Depends, Query

from server.deps import AdminCaller, GatewayDep, require_admin
from server.errors import BadRequestError

router = APIRouter(prefix="/v1/usage", tags=["admin"], dependencies=[Depends(require_admin)])
MONTH = 31 * 86400


@router.get("")
async def get_usage(
    gateway: GatewayDep,
    caller: AdminCaller,
    project: str | None = None,
    start: str | None = Query(None, alias="from", description="Unix time or ISO 8601; default: 31 days ago"),
    end: str | None = Query(None, alias="to", description="Unix time or ISO 8601; default: now"),
) -> dict:
    """Requests and tokens per project, key name and model, summed over every gateway of the state
    database, by the hour (`from` is rounded down to its hour)."""
    if not caller.root:
        project = caller.project
    now = time.time()
    since, until = _when(start, now - MONTH), _when(end, now + 1)
    gateway.usage.write()  # this gateway's latest counts first
    rows = gateway.usage.store.summed(since, until, project)
    return {"object": "list", "from": since, "to": until, "data": [r.model_dump() for r in rows]}


def _when(value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise BadRequestError(f"invalid time {value!r}: give unix seconds or ISO 8601 (2026-12-01)") from None
