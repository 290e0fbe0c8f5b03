"""One Ray Serve replica: one managed vLLM engine, its weight slot, and the relay in front of it.

Each replica is the single-process gateway (server/gateway.py, server/proxy.py) for one engine:
admission only on resident weights, swaps that drain the old variant's requests first, the
engine's answers rewritten at byte level. Ray's model multiplexing (`max_num_models_per_replica=1`)
sees the resident variant as the replica's loaded model and routes a variant's requests to the
replica holding it; `get_model` does the swap through the slot, so Ray's LRU "eviction" never
cuts a running generation — the slot waits for them.

A replica whose engine dies fails its health check; Ray stops routing to it and replaces it
(a new replica starts a fresh engine). Requests that reach it meanwhile are answered
`RETRY` before anything is sent, and the front sends them again (server/cluster/front.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse
from ray import serve

from deltas import __version__
from loaders.engine import EngineError, cores_for
from server.errors import GatewayError
from server.gateway import Gateway
from server.metrics import Metrics
from server.proxy import forward
from server.schemas import parse_inference_body
from server.settings import GatewaySettings

log = logging.getLogger("deltagate.cluster")

RETRY = {"retry": True}  # first item of an answer that never reached an engine: send it elsewhere


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # the engine subprocess does the work; do not reserve Ray CPUs
    health_check_period_s=1.0,
    health_check_timeout_s=30.0,
    graceful_shutdown_timeout_s=60.0,
    max_ongoing_requests=512,
)
class EngineReplica:
    """A vLLM engine for the one base, served through deltagate's slot and relay."""

    async def __init__(self, settings_json: str):
        context = serve.get_replica_context()
        settings = GatewaySettings.model_validate_json(settings_json)
        rank, local, world = context.rank.rank, context.rank.local_rank, context.world_size
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # replicas on one machine split its cores
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores_for(local, world, sorted(os.sched_getaffinity(0)))
        self.settings = settings.model_copy(
            update={
                "state_dir": settings.state_dir / f"replica-{rank}",
                "supervise_seconds": 0,  # no restart in place: Ray replaces the replica
            }
        )
        self.rank = rank
        self.metrics = Metrics(__version__)
        self.gateway = Gateway(self.settings, self.metrics)
        log.info("replica %d/%d: engine on cores %s", rank, world, os.environ["VLLM_CPU_OMP_THREADS_BIND"])
        await self.gateway.start()

    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model: str) -> str:
        """Make `model` resident (a swap that first drains the previous variant's requests)."""
        target = self.gateway.resolve(model)
        await self.gateway.admit(target)
        target.slot.release()
        return model

    async def handle(self, endpoint: str, raw: bytes, headers: dict, chat: bool) -> AsyncIterator:
        """Yield {"status", "media_type", "replica"} (or RETRY), then the answer's bytes."""
        if not self._engine_alive():
            yield RETRY
            return
        try:
            body = parse_inference_body(raw)
            await self.get_model(serve.get_multiplexed_model_id() or body.model)
            response = await forward(self.gateway, self.metrics, endpoint, body, headers, chat=chat)
        except GatewayError as exc:
            yield {"status": exc.status, "kind": exc.kind, "message": str(exc), "replica": self.rank}
            return
        except EngineError as exc:
            # Nothing was sent to the client yet: if the engine died, another replica can answer.
            if await self._engine_died():
                yield RETRY
            else:
                yield {"status": 502, "kind": "engine_error", "message": str(exc), "replica": self.rank}
            return
        yield {"status": response.status_code, "media_type": response.media_type, "replica": self.rank}
        if not isinstance(response, StreamingResponse):
            yield response.body
            return
        chunks = response.body_iterator
        try:
            async for chunk in chunks:
                yield chunk
        finally:  # the client went away (Ray cancels this generator): release the slot now
            await chunks.aclose()

    async def state(self) -> dict:
        """What this replica holds (GET /v1/cluster): rank, resident variant, in flight, swaps, engine pid."""
        slot = next(iter(self.gateway.slots.values()))
        proc = next(iter(self.gateway.processes.values()))
        return {
            "replica": self.rank,
            "resident": slot.resident_variant,
            "inflight": slot.inflight,
            "queued": slot.queued(),
            "swaps": len(slot.recent_swaps),
            "engine_pid": proc.proc.pid if proc.proc else None,
            "engine_url": proc.url,  # loopback: reachable from this machine only
            "engine_alive": proc.alive(),
            "cores": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        }

    async def _engine_died(self, within: float = 1.0) -> bool:
        """Whether the engine is dead, or dies within `within` s (a killed engine resets connections
        a moment before its process is seen to exit)."""
        deadline = asyncio.get_running_loop().time() + within
        while self._engine_alive():
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def _engine_alive(self) -> bool:
        return all(p.alive() for p in self.gateway.processes.values())

    async def check_health(self) -> None:
        """Ray's health check: the engine process must be alive (else Ray replaces this replica)."""
        if not self._engine_alive():
            raise RuntimeError("the vLLM engine of this replica exited")

    async def __del__(self) -> None:
        await asyncio.shield(self.gateway.stop())
