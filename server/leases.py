"""Leases on long jobs in the state database (eval runs, rebases, batches): one gateway executes a job at a
time, the one whose lease on its row (`owner`, `lease_until`) is running; it renews the lease while
it works, and when it dies the lease runs out and another gateway (or the same one restarted) takes
the job over. Statements only: each store runs them in its own transaction."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import sqlalchemy as sa

ACTIVE = ("queued", "in_progress")


def claim(
    table: sa.Table, row_id: str, owner: str, lease: float, force: bool = False, active: tuple = ACTIVE
) -> sa.Update:
    """Lease an active job to `owner` unless another gateway's lease on it is still running
    (`force`: the single gateway of a state dir takes its jobs back at once). `active`: the statuses
    of a job still to be worked on (a batch has OpenAI's own)."""
    now = time.time()
    query = sa.update(table).where(table.c.id == row_id, table.c.status.in_(active))
    if not force:
        free = sa.or_(table.c.owner.is_(None), table.c.owner == owner, table.c.lease_until < now)
        query = query.where(free)
    return query.values(owner=owner, lease_until=now + lease)


def renew(
    conn: sa.Connection, table: sa.Table, owner: str, lease: float, active: tuple = ACTIVE
) -> list[str]:
    """Extend `owner`'s leases; the ids of its jobs still active (one canceled elsewhere is not)."""
    mine = sa.and_(table.c.owner == owner, table.c.status.in_(active))
    conn.execute(sa.update(table).where(mine).values(lease_until=time.time() + lease))
    return [r.id for r in conn.execute(sa.select(table.c.id).where(mine))]


def orphans(table: sa.Table, active: tuple = ACTIVE) -> sa.Select:
    """Active jobs whose lease ran out (their gateway stopped or died), oldest first."""
    query = sa.select(table.c.id).where(table.c.status.in_(active), table.c.lease_until < time.time())
    return query.order_by(table.c.created_at)


def set_status(table: sa.Table, row_id: str, status: str, error: str | None = None) -> sa.Update:
    """Move an active job to `status` (rowcount 0: it is not active any more, canceled meanwhile)."""
    query = sa.update(table).where(table.c.id == row_id, table.c.status.in_(ACTIVE))
    return query.values(status=status, error=error)


class Leased(Protocol):
    """A store of leased jobs (server/evals/store.py, server/rebase/store.py)."""

    def renew(self, owner: str, lease: float) -> list[str]: ...
    def orphans(self) -> list[str]: ...
    def claim(self, job_id: str, owner: str, lease: float, force: bool = False) -> bool: ...


async def follow(
    store: Leased,
    owner: str,
    lease: float,
    running: Mapping[str, object],
    launch: Callable[[str], None],
    what: str,
    lost: Callable[[str], None] | None = None,
) -> None:
    """Every third of a lease: renew `owner`'s leases, call `lost` for a job in `running` (its id →
    its task) no longer
    active (canceled or deleted through another gateway), `launch` jobs whose gateway is gone."""
    log = logging.getLogger("deltagate")
    while True:
        await asyncio.sleep(lease / 3)
        try:
            active = set(store.renew(owner, lease))
            for job_id in set(running) - active if lost is not None else ():
                lost(job_id)
            for job_id in store.orphans():
                if job_id not in running and store.claim(job_id, owner, lease):
                    log.info("taking over %s %s (its gateway is gone)", what, job_id)
                    launch(job_id)
        except Exception:  # the database away for a while: keep trying
            log.exception("following %ss failed; trying again", what)


async def stop(follower: asyncio.Task | None, running: Mapping[str, asyncio.Task]) -> None:
    """Stop following leases and cancel the jobs running here (they resume at the next start)."""
    if follower is not None:
        follower.cancel()
    for task in running.values():
        task.cancel()
    await asyncio.gather(*running.values(), return_exceptions=True)
