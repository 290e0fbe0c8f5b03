"""Rebases in the state database: request, status and report survive a restart (server/leases.py:
one gateway executes a rebase at a time; another takes it over when that one is gone)."""

from __future__ import annotations

import json
import time
import uuid

import sqlalchemy as sa

from server import leases
from server.statedb import Store, metadata
from server.tenancy import KEY, PROJECT

_rebases = sa.Table(
    "rebases",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("report", sa.Text, nullable=False),
    sa.Column("owner", sa.String(128)),
    sa.Column("lease_until", sa.Float),
)


class RebaseStore(Store):
    """Rebase rows in, dicts out."""

    def add(
        self,
        body: dict,
        report: dict,
        owner: str,
        lease: float,
        project: str | None = None,
        key: str | None = None,
    ) -> str:
        """A queued rebase leased to gateway `owner`: `project`'s (None: root's), run with key `key`'s
        scopes."""
        rebase_id = f"rebase_{uuid.uuid4().hex[:16]}"
        stored = {**body, PROJECT: project, KEY: key} if project else body
        row = {
            "id": rebase_id,
            "created_at": time.time(),
            "body": json.dumps(stored),
            "status": "queued",
            "report": json.dumps(report),
            "owner": owner,
            "lease_until": time.time() + lease,
        }
        self._run(lambda c: c.execute(sa.insert(_rebases).values(row)))
        return rebase_id

    def get(self, rebase_id: str) -> dict | None:
        row = self._run(lambda c: c.execute(sa.select(_rebases).where(_rebases.c.id == rebase_id)).first())
        return _dict(row) if row else None

    def all(self, statuses: tuple[str, ...] = ()) -> list[dict]:
        query = sa.select(_rebases).order_by(_rebases.c.created_at)
        if statuses:
            query = query.where(_rebases.c.status.in_(statuses))
        return [_dict(r) for r in self._run(lambda c: c.execute(query).all())]

    def save_report(self, rebase_id: str, report: dict) -> None:
        query = sa.update(_rebases).where(_rebases.c.id == rebase_id).values(report=json.dumps(report))
        self._run(lambda c: c.execute(query))

    def set_status(self, rebase_id: str, status: str, error: str | None = None) -> bool:
        """Move an active rebase to `status`; False if it is not active any more (canceled)."""
        query = leases.set_status(_rebases, rebase_id, status, error)
        return self._run(lambda c: c.execute(query).rowcount == 1)

    def claim(self, rebase_id: str, owner: str, lease: float, force: bool = False) -> bool:
        query = leases.claim(_rebases, rebase_id, owner, lease, force)
        return self._run(lambda c: c.execute(query).rowcount == 1)

    def renew(self, owner: str, lease: float) -> list[str]:
        return self._run(lambda c: leases.renew(c, _rebases, owner, lease))

    def orphans(self) -> list[str]:
        return [r.id for r in self._run(lambda c: c.execute(leases.orphans(_rebases)).all())]


def _dict(row) -> dict:
    body = json.loads(row.body)
    project, key = body.pop(PROJECT, None), body.pop(KEY, None)
    return {**row._asdict(), "project": project, "key": key, "body": body, "report": json.loads(row.report)}
