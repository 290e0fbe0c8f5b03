"""Files and batches in the state database (server/statedb.py), where eval runs and rebases are: every
gateway on a shared database sees every batch and file, and a batch is run by the one gateway holding
its lease (server/leases.py); when that gateway dies, another takes it over and resumes it, skipping
the lines already answered (each answer is a row, written as it arrives).

A file's bytes are a row too (`file_data`), written with its record in one transaction: there is
never a record without its bytes, nor bytes without a record, whichever gateway dies when. Not the
artifact store: that one is content-addressed and write-once for deltas, and batch files are small
(OpenAI caps them at 200 MB; the upload is bounded by --max-body-bytes) and deleted by users.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import sqlalchemy as sa

from server import leases
from server.errors import NotFoundError
from server.statedb import Store, metadata
from server.tenancy import PROJECT

# A batch's statuses while someone must work on it (OpenAI's names): the ones its lease covers.
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")

_files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("record", sa.Text, nullable=False),  # OpenAI's file object
)
_file_data = sa.Table(
    "file_data",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)
_batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("batch", sa.Text, nullable=False),  # OpenAI's batch object
    sa.Column("owner", sa.String(128)),  # the gateway running it
    sa.Column("lease_until", sa.Float),
)
_answers = sa.Table(
    "batch_answers",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # the order answers came in
    sa.Column("batch_id", sa.String(64), nullable=False, index=True),
    sa.Column("custom_id", sa.String(512), nullable=False),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("line", sa.Text, nullable=False),  # the output (or error) file's line
    sa.UniqueConstraint("batch_id", "custom_id"),
)


# Files and batches belong to the project of the key that made them (PROJECT in the stored object,
# never shown): a project's keys see only theirs; keys of no project (--api-key, or none) see those of
# no project. `project=None` in the calls below: the gateway's own calls (every one).


def public(record: dict) -> dict:
    """The stored object as clients see it (without the gateway's own fields: PROJECT, ...)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def _owned(record: dict | None, project: str | None) -> bool:
    return record is not None and (project is None or record.get(PROJECT, "") == project)


class FileStore(Store):
    """Files by id (`file-<hex>`): OpenAI's file objects and their bytes."""

    def add(self, data: bytes, filename: str, purpose: str, project: str = "") -> dict:
        """Store `data` as a new file of `project`; its OpenAI file object."""
        file_id = f"file-{secrets.token_hex(12)}"
        record = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        stored = json.dumps(record | {PROJECT: project})
        row = {"id": file_id, "created_at": time.time(), "purpose": purpose, "record": stored}

        def insert(conn: sa.Connection) -> None:
            conn.execute(sa.insert(_files).values(row))
            conn.execute(sa.insert(_file_data).values(id=file_id, data=data))

        self._run(insert)
        return record

    def get(self, file_id: str, project: str | None = None) -> dict:
        """The file's object; 404 if there is none of `project`'s by that id."""
        row = self._run(lambda c: c.execute(sa.select(_files.c.record).where(_files.c.id == file_id)).first())
        record = json.loads(row.record) if row is not None else None
        if not _owned(record, project):
            raise NotFoundError(f"file {file_id!r} not found")
        return public(record)

    def content(self, file_id: str, project: str | None = None) -> bytes:
        self.get(file_id, project)
        query = sa.select(_file_data.c.data).where(_file_data.c.id == file_id)
        row = self._run(lambda c: c.execute(query).first())
        if row is None:
            raise NotFoundError(f"file {file_id!r} not found")
        return bytes(row.data)

    def list(self, purpose: str | None = None, project: str | None = None) -> list[dict]:
        query = sa.select(_files.c.record).order_by(_files.c.created_at, _files.c.id)
        if purpose is not None:
            query = query.where(_files.c.purpose == purpose)
        records = [json.loads(r.record) for r in self._run(lambda c: c.execute(query).all())]
        return [public(r) for r in records if _owned(r, project)]

    def delete(self, file_id: str, project: str | None = None) -> None:
        self.get(file_id, project)

        def remove(conn: sa.Connection) -> int:
            conn.execute(sa.delete(_file_data).where(_file_data.c.id == file_id))
            return conn.execute(sa.delete(_files).where(_files.c.id == file_id)).rowcount

        if not self._run(remove):
            raise NotFoundError(f"file {file_id!r} not found")


class BatchStore(Store):
    """Batch objects, their leases and their answers."""

    def add(self, batch: dict, owner: str, lease: float) -> None:
        row = {
            "id": batch["id"],
            "created_at": time.time(),
            "status": batch["status"],
            "batch": json.dumps(batch),
            "owner": owner,
            "lease_until": time.time() + lease,
        }
        self._run(lambda c: c.execute(sa.insert(_batches).values(row)))

    def get(self, batch_id: str, project: str | None = None) -> dict:
        """The stored batch object (with its project); 404 if there is none of `project`'s by that id."""
        query = sa.select(_batches.c.batch).where(_batches.c.id == batch_id)
        row = self._run(lambda c: c.execute(query).first())
        batch = json.loads(row.batch) if row is not None else None
        if not _owned(batch, project):
            raise NotFoundError(f"batch {batch_id!r} not found")
        return batch

    def all(self, statuses: tuple[str, ...] = (), project: str | None = None) -> list[dict]:
        query = sa.select(_batches.c.batch).order_by(_batches.c.created_at, _batches.c.id)
        if statuses:
            query = query.where(_batches.c.status.in_(statuses))
        batches = [json.loads(r.batch) for r in self._run(lambda c: c.execute(query).all())]
        return [b for b in batches if _owned(b, project)]

    def update(self, batch_id: str, **fields) -> dict:
        """Change fields of the batch object in one transaction (read, merge, write); the new object."""

        def change(conn: sa.Connection) -> dict:
            query = sa.select(_batches.c.batch).where(_batches.c.id == batch_id).with_for_update()
            row = conn.execute(query).first()
            if row is None:
                raise NotFoundError(f"batch {batch_id!r} not found")
            batch = json.loads(row.batch) | fields
            values = {"batch": json.dumps(batch), "status": batch["status"]}
            conn.execute(sa.update(_batches).where(_batches.c.id == batch_id).values(values))
            return batch

        return self._run(change)

    def add_answer(self, batch_id: str, custom_id: str, ok: bool, line: dict) -> None:
        row = {"batch_id": batch_id, "custom_id": custom_id, "ok": ok, "line": json.dumps(line)}
        self._run(lambda c: c.execute(sa.insert(_answers).values(row)))

    def answers(self, batch_id: str) -> tuple[list[dict], list[dict]]:
        """The lines answered so far, in the order they came: (successes, failures)."""
        query = sa.select(_answers.c.ok, _answers.c.line).where(_answers.c.batch_id == batch_id)
        rows = self._run(lambda c: c.execute(query.order_by(_answers.c.seq)).all())
        return [json.loads(r.line) for r in rows if r.ok], [json.loads(r.line) for r in rows if not r.ok]

    def drop_answers(self, batch_id: str) -> None:
        """Forget the answers once they are in the batch's output and error files."""
        self._run(lambda c: c.execute(sa.delete(_answers).where(_answers.c.batch_id == batch_id)))

    # leases (server/leases.py), over a batch's active statuses
    def claim(self, batch_id: str, owner: str, lease: float, force: bool = False) -> bool:
        query = leases.claim(_batches, batch_id, owner, lease, force, active=ACTIVE)
        return self._run(lambda c: c.execute(query).rowcount == 1)

    def renew(self, owner: str, lease: float) -> list[str]:
        return self._run(lambda c: leases.renew(c, _batches, owner, lease, active=ACTIVE))

    def orphans(self) -> list[str]:
        return [r.id for r in self._run(lambda c: c.execute(leases.orphans(_batches, active=ACTIVE)).all())]


def import_dir(engine: sa.Engine, files_dir: Path, batches_dir: Path) -> int:
    """Bring an earlier version's files and batches (JSON in the state dir) into the database; how
    many were imported. Batches keep the answers their partial files hold."""
    count, batches = 0, BatchStore(engine)
    with engine.begin() as conn:
        for path in sorted(files_dir.glob("file-*.json")) if files_dir.is_dir() else []:
            record = json.loads(path.read_text())
            file_id, data = record["id"], path.with_suffix(".data").read_bytes()
            row = {
                "id": file_id,
                "created_at": record["created_at"],
                "purpose": record["purpose"],
                "record": json.dumps(record),
            }
            conn.execute(sa.insert(_files).values(row))
            conn.execute(sa.insert(_file_data).values(id=file_id, data=data))
            count += 1
    for path in sorted(batches_dir.glob("batch_*.json")) if batches_dir.is_dir() else []:
        batch = json.loads(path.read_text())
        batches.add(batch, owner="", lease=0)
        for kind, ok in (("output", True), ("errors", False)):
            partial = path.with_name(f"{batch['id']}.{kind}.jsonl")
            for raw in partial.read_text().splitlines() if partial.is_file() else []:
                try:
                    line = json.loads(raw)
                except ValueError:  # the last line, cut off by a crash: asked again
                    continue
                batches.add_answer(batch["id"], line["custom_id"], ok, line)
        count += 1
    return count
