"""Usage per project, key and model: requests and tokens (prompt and completion, as the engine counts
them), kept in the state database by the hour.

Each gateway adds up its own requests in memory and writes them every `poll` seconds (a task of
server/gateway.py; also on stop, and before answering a usage query) into its own rows (one per
hour, gateway, key and model), so no two gateways ever write the same row and a request costs no
database write. GET /v1/usage sums every gateway's rows.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict

import sqlalchemy as sa
from pydantic import BaseModel

from server.statedb import Store, metadata
from server.tenancy import Principal

usage_table = sa.Table(
    "usage",
    metadata,
    sa.Column("hour", sa.Float, nullable=False),  # the hour's start (unix time)
    sa.Column("front", sa.String(32), nullable=False),  # the gateway that served them
    sa.Column("project", sa.String(64), nullable=False),  # "" for the admin token and --api-key keys
    sa.Column("key", sa.String(200), nullable=False),  # the key's name (PROJECT/NAME), never its secret
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("hour", "front", "project", "key", "model"),
)
_COUNTS = ("requests", "prompt_tokens", "completion_tokens")


class UsageRow(BaseModel):
    project: str
    key: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


class UsageStore(Store):
    """The usage table."""

    def add(self, front: str, counts: dict[tuple, list[int]]) -> None:
        """Add `counts` ((hour, project, key, model) -> [requests, prompt, completion]) to `front`'s rows."""

        def work(conn):
            for (hour, project, key, model), values in counts.items():
                where = sa.and_(
                    usage_table.c.hour == hour,
                    usage_table.c.front == front,
                    usage_table.c.project == project,
                    usage_table.c.key == key,
                    usage_table.c.model == model,
                )
                add = {c: getattr(usage_table.c, c) + v for c, v in zip(_COUNTS, values, strict=True)}
                if conn.execute(usage_table.update().where(where).values(**add)).rowcount == 0:
                    row = dict(zip(_COUNTS, values, strict=True))
                    conn.execute(
                        usage_table.insert().values(
                            hour=hour, front=front, project=project, key=key, model=model, **row
                        )
                    )

        self._run(work)

    def summed(self, start: float, end: float, project: str | None = None) -> list[UsageRow]:
        """Every front's counts per project, key and model over the hours starting in [start, end)."""
        c = usage_table.c
        query = (
            sa.select(c.project, c.key, c.model, *[sa.func.sum(getattr(c, n)).label(n) for n in _COUNTS])
            .where(c.hour >= start - start % 3600, c.hour < end)
            .group_by(c.project, c.key, c.model)
            .order_by(c.project, c.key, c.model)
        )
        if project is not None:
            query = query.where(c.project == project)
        return self._run(lambda conn: [UsageRow(**r) for r in conn.execute(query).mappings()])


class Usage:
    """This gateway's counts since its last write."""

    def __init__(self, store: UsageStore):
        self.store = store
        self.front = uuid.uuid4().hex
        self._counts: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
        self._lock = threading.Lock()

    def add(self, caller: Principal, model: str, usage: dict | None) -> None:
        """Count one answered request of `caller` on `model` with the engine's `usage` (if any)."""
        now = time.time()
        counts = self._counts[(now - now % 3600, caller.project or "", caller.name, model)]
        counts[0] += 1
        counts[1] += (usage or {}).get("prompt_tokens") or 0
        counts[2] += (usage or {}).get("completion_tokens") or 0

    def write(self) -> None:
        """Write what was counted since the last write (kept for the next one if the database fails)."""
        with self._lock:
            counts, self._counts = dict(self._counts), defaultdict(lambda: [0, 0, 0])
            if not counts:
                return
            try:
                self.store.add(self.front, counts)
            except Exception:
                for k, values in counts.items():
                    self._counts[k] = [a + b for a, b in zip(self._counts[k], values, strict=True)]
                raise
