"""create_app(settings): the FastAPI gateway, with engines started in its lifespan."""

from __future__ import annotations

import gc
import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from deltas import DeltaError, __version__
from loaders.engine import EngineError
from server.batches.service import BatchService
from server.batches.store import BatchStore, FileStore
from server.errors import GatewayError, install_error_handlers
from server.evals.service import EvalService
from server.evals.store import EvalStore
from server.gateway import Gateway
from server.limits import BodyLimit
from server.metrics import Metrics
from server.pool import EnginePool
from server.rebase.service import RebaseService
from server.rebase.store import RebaseStore
from server.registry import Registry
from server.routes import aliases, bases, batches, deltas, files, keys, openai, ops, rebases, usage, variants
from server.routes import evals as evals_routes
from server.schema import open_state
from server.settings import GatewaySettings
from server.streaming import StallWatch


def ensure_admin_token(settings: GatewaySettings) -> str:
    """Use the configured admin token, else a persisted generated one (state_dir/admin_token, 0600)."""
    private_state_dir(settings)
    if settings.admin_token:
        return settings.admin_token
    path = settings.state_dir / "admin_token"
    if path.is_file():
        settings.admin_token = path.read_text().strip()
        path.chmod(0o600)
    else:
        settings.admin_token = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(fd, "w") as out:
            out.write(settings.admin_token + "\n")
    return settings.admin_token


def private_state_dir(settings: GatewaySettings) -> None:
    """The state dir holds the admin token, uploads and logs: owner-only (0700)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.state_dir.chmod(0o700)


def create_app(settings: GatewaySettings, pool: EnginePool | None = None) -> FastAPI:
    """Build the gateway app; engines start when the app starts and stop when it stops. `pool`:
    where the engines run (default: processes on this machine, server/pool.py)."""
    ensure_admin_token(settings)
    metrics = Metrics(__version__)
    database = open_state(settings.state_db, settings.state_dir)  # registry and evals (server/statedb.py)
    gateway = Gateway(settings, metrics, Registry(database), pool)
    metrics.watch_engines(gateway.engine_states)
    evals = EvalService(
        EvalStore(database),
        gateway,
        metrics,
        allow_code_execution=settings.allow_code_execution,
    )

    rebase_service = RebaseService(RebaseStore(database), gateway, evals)
    file_store = FileStore(database)
    batch_service = BatchService(BatchStore(database), file_store, gateway, metrics, evals.owner, evals.lease)
    streams = StallWatch(
        settings.stream_write_timeout, lambda variant: metrics.stalled_streams.labels(variant).inc()
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            try:
                await gateway.start()
            except (
                GatewayError,
                EngineError,
                DeltaError,
            ) as exc:  # the operator's problem: say it in one line
                logging.getLogger("deltagate").error("cannot start: %s", exc)
                raise
            await evals.start()
            await rebase_service.start()
            await batch_service.start()
            streams.start()
            # Everything loaded so far (torch, pydantic, the registry: ~200k objects) lives as long
            # as the process; freezing it keeps the collector from rescanning it under load, where a
            # full collection stalled every stream for ~100 ms (seen as TTFT p99 spikes).
            gc.freeze()
            yield
        finally:
            await streams.stop()
            await batch_service.stop()
            await rebase_service.stop()
            await evals.stop()
            await gateway.stop()
            database.dispose()

    app = FastAPI(title="deltagate", version=__version__, lifespan=lifespan)
    app.state.gateway = gateway
    app.state.metrics = metrics
    app.state.evals = evals
    app.state.rebases = rebase_service
    app.state.files = file_store
    app.state.batches = batch_service
    app.state.streams = streams
    install_error_handlers(app, hide=str(settings.state_dir.resolve()))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.include_router(openai.inference)
    app.include_router(openai.tokenizer)
    routers = (openai, bases, deltas, variants, aliases, keys, usage, rebases, ops, evals_routes)
    for module in (*routers, files, batches):
        app.include_router(module.router)
    return app


def serve_app(
    settings: GatewaySettings, host: str, port: int, access_log: bool, pool: EnginePool | None = None
) -> None:
    """Serve the gateway with uvicorn until interrupted (local engines, or `pool`'s)."""
    import uvicorn

    app = create_app(settings, pool)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="info",
        access_log=access_log,
        timeout_keep_alive=settings.keep_alive_seconds,
    )
