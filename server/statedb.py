"""Where the gateway's state lives: one SQL database (SQLAlchemy), the registry and the eval store.

By default a SQLite file in the state dir (`STATE_DIR/state.sqlite`): one gateway, no server to run.
Several gateways in front of one fleet share a PostgreSQL database (`serve --state-db
postgresql://user:password@host/db`) and so share every base, delta, variant and eval, durably
across a restart of any gateway or engine. A database rather than the object store: the eval store
is rows written one item at a time and read in pages, and several writers need transactions and
conditional updates (the registry's version, a run's lease), which is what a database does and an
object store does not. The artifacts themselves stay in the artifact store (deltas/store.py).

This module is the leaf every store builds on (the shared `metadata`, `Store`, `connect`); it
imports none of them. server/schema.py, above them all, creates their tables.
"""

from __future__ import annotations

import sqlalchemy as sa

from server.errors import UnavailableError

metadata = sa.MetaData()


def connect(url: str) -> sa.Engine:
    """An engine on `url` (no connection made yet); SQLite in WAL mode (readers never wait)."""
    for plain in ("postgresql://", "postgres://"):  # the driver installed with deltagate: psycopg 3
        if url.startswith(plain):
            url = "postgresql+psycopg://" + url[len(plain) :]
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _wal(dbapi, _record) -> None:
            dbapi.execute("PRAGMA journal_mode=WAL")
    else:  # a server: connections may be cut (a restart); test each before use
        engine = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_timeout=10)
    return engine


class Store:
    """A store of rows in the state database: each call is one transaction; a database error is a
    503 naming the database (never its password)."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def _run(self, work):
        try:
            with self.engine.begin() as conn:
                return work(conn)
        except sa.exc.DBAPIError as exc:
            raise UnavailableError(unreachable(self.engine, exc)) from None


def shared(engine: sa.Engine) -> bool:
    """Whether other gateways may write this database too (a server, not this state dir's file)."""
    return engine.dialect.name != "sqlite"


def unreachable(engine: sa.Engine, exc: Exception) -> str:
    """What a client is told when the database fails: its kind and host, never its password."""
    where = engine.url.render_as_string(hide_password=True)
    if engine.dialect.name == "sqlite":
        where = "the state dir's database"
    return f"the state database ({where}) cannot be used now: {type(exc.orig or exc).__name__}; retry shortly"
