"""The state database's schema: every store's tables, created once per database, and the import of
an earlier version's state files. Above the stores (they declare their tables on
server/statedb.py's `metadata`); only the app calls it.

Several gateways may start at once on one fresh database, as replicas do: the tables are created
under a PostgreSQL advisory lock, so one creates them and the others find them, and a start-up that
meets a database error (not up yet, a race, a restart) tries again for `retry_seconds` before it
gives up.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from pathlib import Path

import sqlalchemy as sa

import server.batches.store as batches_store
import server.evals.store as evals_store
import server.quota  # noqa: F401  (its table)
import server.rebase.store  # noqa: F401  (its tables)
import server.registry as registry
import server.tenancy  # noqa: F401  (its table)
import server.usage  # noqa: F401  (its table)
from server.errors import UnavailableError
from server.statedb import connect, metadata, unreachable

log = logging.getLogger("deltagate")
SCHEMA_LOCK = 0x64656C7461  # pg_advisory_xact_lock key: "delta", the same for every gateway


def open_state(url: str | None, state_dir: Path, retry_seconds: float = 30.0) -> sa.Engine:
    """The state database: `url` (shared by several gateways), else this state dir's SQLite file,
    with every table created and an earlier version's state files imported."""
    engine = connect(url or f"sqlite:///{(state_dir / 'state.sqlite').resolve()}")
    create_tables(engine, retry_seconds)
    if url is None:
        import_old_state(state_dir, engine)
    return engine


def create_tables(engine: sa.Engine, retry_seconds: float = 30.0) -> None:
    """Create what is missing, one gateway at a time; retry database errors until `retry_seconds`."""
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":  # held to the commit: the DDL is transactional
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK})
                metadata.create_all(conn)
            return
        except sa.exc.DBAPIError as exc:
            if time.monotonic() > deadline:
                raise UnavailableError(unreachable(engine, exc)) from None
            log.warning("%s; trying again", unreachable(engine, exc).removesuffix("; retry shortly"))
            time.sleep(1.0)


def import_old_state(state_dir: Path, engine: sa.Engine) -> None:
    """Bring a state dir of an earlier version (registry.json, evals.sqlite, the files/ and batches/
    dirs) into the database once."""
    old_registry, old_evals = state_dir / "registry.json", state_dir / "evals.sqlite"
    if old_registry.is_file():
        registry.import_json(engine, old_registry.read_text())
        os.replace(old_registry, old_registry.with_name("registry.json.imported"))
        log.info("imported %s into the state database", old_registry.name)
    if old_evals.is_file():
        with sqlite3.connect(old_evals) as old:
            evals_store.import_sqlite(engine, old)
        os.replace(old_evals, old_evals.with_name("evals.sqlite.imported"))
        log.info("imported %s into the state database", old_evals.name)
    old_files, old_batches = state_dir / "files", state_dir / "batches"
    if old_files.is_dir() or old_batches.is_dir():
        count = batches_store.import_dir(engine, old_files, old_batches)
        for old in (old_files, old_batches):
            if old.is_dir():
                os.replace(old, old.with_name(f"{old.name}.imported"))
        log.info("imported %d files and batches into the state database", count)
