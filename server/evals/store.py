"""Evals, runs and graded items in the state database (server/statedb.py): they survive restarts.

A run is executed by one gateway at a time: the one holding its lease (`owner`, `lease_until`),
renewed while it runs. When that gateway dies, the lease runs out and another gateway (or the same
one restarted) claims the run and resumes it, skipping graded items. With the single-gateway
default (SQLite in the state dir) a restarted gateway claims its runs at once.

Every statement is a small write or read; they run on the event loop's thread (SQLite locally, a
PostgreSQL round trip when shared).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

import sqlalchemy as sa

from server import leases
from server.statedb import Store, metadata
from server.tenancy import KEY, PROJECT

# PROJECT and KEY are kept in an eval's and a run's stored body, out of the dicts' "body": the project
# owning an eval (a project admin key sees only its project's), the key a run was started with.

_evals = sa.Table(
    "evals",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
)
_runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("eval_id", sa.String(64), index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("total", sa.Integer),
    sa.Column("measured", sa.Text),
    sa.Column("owner", sa.String(128)),  # the gateway executing it
    sa.Column("lease_until", sa.Float),  # wall-clock time its owner's lease ends
)
_items = sa.Table(
    "items",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # the output-items cursor
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("variant", sa.String(128), nullable=False),
    sa.Column("idx", sa.Integer, nullable=False),
    sa.Column("input", sa.Text),
    sa.Column("output", sa.Text),
    sa.Column("grades", sa.Text),
    sa.Column("status", sa.String(16)),
    sa.Column("error", sa.Text),
    sa.Column("scores", sa.Text),
    sa.UniqueConstraint("run_id", "variant", "idx"),
)


class EvalStore(Store):
    """Rows in, dicts out."""

    # evals
    def add_eval(self, body: dict, project: str | None = None) -> str:
        """A new eval, owned by `project` (None: root's)."""
        eval_id = f"eval_{uuid.uuid4().hex[:16]}"
        stored = {**body, PROJECT: project} if project else body
        row = {"id": eval_id, "created_at": time.time(), "body": json.dumps(stored)}
        self._run(lambda c: c.execute(sa.insert(_evals).values(row)))
        return eval_id

    def eval(self, eval_id: str) -> dict | None:
        row = self._run(lambda c: c.execute(sa.select(_evals).where(_evals.c.id == eval_id)).first())
        return _eval_dict(row) if row else None

    def evals(self) -> list[dict]:
        rows = self._run(lambda c: c.execute(sa.select(_evals).order_by(_evals.c.created_at)).all())
        return [_eval_dict(r) for r in rows]

    def delete_run(self, run_id: str) -> None:
        def work(conn: sa.Connection) -> None:
            conn.execute(sa.delete(_items).where(_items.c.run_id == run_id))
            conn.execute(sa.delete(_runs).where(_runs.c.id == run_id))

        self._run(work)

    def delete_eval(self, eval_id: str) -> None:
        def work(conn: sa.Connection) -> None:
            runs = sa.select(_runs.c.id).where(_runs.c.eval_id == eval_id)
            conn.execute(sa.delete(_items).where(_items.c.run_id.in_(runs)))
            conn.execute(sa.delete(_runs).where(_runs.c.eval_id == eval_id))
            conn.execute(sa.delete(_evals).where(_evals.c.id == eval_id))

        self._run(work)

    # runs
    def add_run(
        self,
        eval_id: str,
        body: dict,
        total: int,
        measured: dict,
        owner: str,
        lease: float,
        key: str | None = None,
    ) -> str:
        """A queued run, leased to `owner` for `lease` seconds; run with the scopes of key `key`."""
        run_id = f"evalrun_{uuid.uuid4().hex[:16]}"
        row = {
            "id": run_id,
            "eval_id": eval_id,
            "created_at": time.time(),
            "body": json.dumps({**body, KEY: key} if key else body),
            "status": "queued",
            "total": total,
            "measured": json.dumps(measured),
            "owner": owner,
            "lease_until": time.time() + lease,
        }
        self._run(lambda c: c.execute(sa.insert(_runs).values(row)))
        return run_id

    def run(self, run_id: str) -> dict | None:
        row = self._run(lambda c: c.execute(sa.select(_runs).where(_runs.c.id == run_id)).first())
        return _run_dict(row) if row else None

    def runs(self, eval_id: str | None = None, statuses: tuple[str, ...] = ()) -> list[dict]:
        query = sa.select(_runs).order_by(_runs.c.created_at)
        if eval_id:
            query = query.where(_runs.c.eval_id == eval_id)
        if statuses:
            query = query.where(_runs.c.status.in_(statuses))
        return [_run_dict(r) for r in self._run(lambda c: c.execute(query).all())]

    def set_status(self, run_id: str, status: str, error: str | None = None) -> bool:
        """Move an active run to `status`; False if it is not active any more (canceled meanwhile)."""
        return self._run(lambda c: c.execute(leases.set_status(_runs, run_id, status, error)).rowcount == 1)

    def claim(self, run_id: str, owner: str, lease: float, force: bool = False) -> bool:
        """Lease an active run to `owner` (server/leases.py)."""
        return self._run(lambda c: c.execute(leases.claim(_runs, run_id, owner, lease, force)).rowcount == 1)

    def renew(self, owner: str, lease: float) -> list[str]:
        """Extend `owner`'s leases; the ids of its runs still active (one canceled elsewhere is not)."""
        return self._run(lambda c: leases.renew(c, _runs, owner, lease))

    def orphans(self) -> list[str]:
        """Active runs whose lease ran out (their gateway stopped or died)."""
        return [r.id for r in self._run(lambda c: c.execute(leases.orphans(_runs)).all())]

    # items
    def put_item(self, run_id: str, variant: str, idx: int, row: dict) -> None:
        values = {
            "input": row["input"],
            "output": row["output"],
            "grades": json.dumps(row["grades"]),
            "status": row["status"],
            "error": row["error"],
            "scores": json.dumps(row.get("scores") or {}),
        }
        key = {"run_id": run_id, "variant": variant, "idx": idx}

        def work(conn: sa.Connection) -> None:
            done = conn.execute(
                sa.update(_items)
                .where(_items.c.run_id == run_id, _items.c.variant == variant, _items.c.idx == idx)
                .values(values)
            )
            if done.rowcount == 0:
                conn.execute(sa.insert(_items).values({**key, **values}))

        self._run(work)

    def done_indices(self, run_id: str, variant: str) -> set[int]:
        query = sa.select(_items.c.idx).where(_items.c.run_id == run_id, _items.c.variant == variant)
        return {r.idx for r in self._run(lambda c: c.execute(query))}

    def items(
        self, run_id: str, status: str | None = None, after: int = -1, limit: int | None = None
    ) -> list[dict]:
        query = sa.select(_items).where(_items.c.run_id == run_id, _items.c.seq > after)
        query = query.order_by(_items.c.seq)
        if status:
            query = query.where(_items.c.status == status)
        if limit:
            query = query.limit(int(limit))
        rows = self._run(lambda c: c.execute(query).all())
        return [
            {**r._asdict(), "grades": json.loads(r.grades), "scores": json.loads(r.scores or "{}")}
            for r in rows
        ]


def _eval_dict(row) -> dict:
    body = json.loads(row.body)
    return {"id": row.id, "created_at": row.created_at, "project": body.pop(PROJECT, None), "body": body}


def _run_dict(row) -> dict:
    body = json.loads(row.body)
    return {**row._asdict(), "key": body.pop(KEY, None), "body": body, "measured": json.loads(row.measured)}


def import_sqlite(engine: sa.Engine, old: sqlite3.Connection) -> None:
    """Copy an earlier version's evals.sqlite (evals, runs, items in their order) into `engine`."""
    old.row_factory = sqlite3.Row
    evals = [dict(r) for r in old.execute("SELECT * FROM evals")]
    runs = [{**dict(r), "owner": None, "lease_until": 0.0} for r in old.execute("SELECT * FROM runs")]
    item_columns = [c.name for c in _items.columns if c.name != "seq"]
    items = [
        {c: r[c] if c in r.keys() else None for c in item_columns}
        for r in old.execute("SELECT * FROM items ORDER BY rowid")
    ]
    with engine.begin() as conn:
        for table, rows in ((_evals, evals), (_runs, runs), (_items, items)):
            if rows:
                conn.execute(sa.insert(table), rows)
