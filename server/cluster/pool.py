"""RayPool: the engines of a gateway as Ray Serve replicas, one deployment per base.

Ray does placement and lifecycle (the control plane): each EngineHost replica starts one vLLM
engine (with deltagate's worker extension) on its node, on the node's address, and Ray replaces a
replica whose engine died. The gateway (the same app as on one machine) keeps a weight slot per
engine and sends each request to the engine it admitted it on, directly (the data plane): no token
passes through Ray. Replicas announce themselves in a named actor (the directory); the gateway
reads it every second and when a request finds an engine dead.

Several gateways share one cluster (and, with --state-db, one state): each runs Serve applications
of its own, named after it, and admits requests on its own engines only, since a gateway swaps the
weights of the engines it admits requests on and two would swap them under each other's requests.

What the gateway needs of a node: the base checkpoints at the same path, and the artifact store
(deltas/store.py) reachable. Registry, evals, uploads and the admin token stay with the gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import ray
from ray import serve
from ray.serve.config import AutoscalingContext

from loaders.engine import EngineProcess, cores_for
from server.errors import BadRequestError
from server.pool import Endpoint, EnginePool, OnDead, managed_spec
from server.registry import BaseRecord
from server.settings import GatewaySettings

log = logging.getLogger("deltagate.cluster")

NAMESPACE = "deltagate"
DIRECTORY = "deltagate-engines"
HEARTBEAT_STALE = 10.0  # seconds without a health check after which an engine is taken for gone
REFILL_SECONDS = 5.0  # a restarted directory is refilled by the replicas' heartbeats (every 1 s)


# Restarted by Ray if it dies (its process killed, its node lost): it starts empty and is filled
# again by the replicas' next heartbeats, within a health-check period. Calls made meanwhile are
# retried by Ray.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Directory:
    """engine id -> (base, url, pid, node, last heartbeat): what replicas announce, read by gateways."""

    def __init__(self) -> None:
        self.engines: dict[str, dict] = {}
        self.started = time.time()
        self.gateways: dict[str, tuple[str, float]] = {}  # gateway -> (its running instance, last heard)

    def drive(self, gateway: str, instance: str) -> bool:
        """A heartbeat of `instance` of `gateway` (the process running it now); False while another
        instance of the same gateway was heard from within HEARTBEAT_STALE: two processes on one
        gateway's applications would swap its engines under each other's requests."""
        now = time.time()
        current, seen = self.gateways.get(gateway, ("", 0.0))
        if current and current != instance and now - seen < HEARTBEAT_STALE:
            return False
        self.gateways[gateway] = (instance, now)
        return True

    def pid(self) -> int:
        return os.getpid()

    def announce(self, id: str, entry: dict) -> None:
        self.engines[id] = {**entry, "seen": time.time()}

    def withdraw(self, id: str) -> None:
        self.engines.pop(id, None)

    def list(self) -> dict:
        """The engines heard from lately, and when this directory (re)started."""
        now = time.time()
        fresh = {i: e for i, e in self.engines.items() if now - e["seen"] < HEARTBEAT_STALE}
        return {"started": self.started, "engines": fresh}


def directory() -> ray.actor.ActorHandle:
    """The cluster's directory of engines (created by the first caller, kept while Ray runs)."""
    return Directory.options(
        name=DIRECTORY, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def node_dir() -> Path:
    """This node's own directory for engine logs and its artifact cache (not the gateway's)."""
    return Path(os.environ.get("DELTAGATE_NODE_DIR") or Path(tempfile.gettempdir()) / "deltagate-node")


@dataclass(frozen=True)
class Scaling:
    """How many engine replicas a base gets: fixed (`replicas`), or following load up to `max_replicas`."""

    replicas: int = 2
    max_replicas: int | None = None  # None: a fixed count
    target_requests: float = 8.0  # running + waiting requests per engine the autoscaler aims at
    scale_down_delay: float = 60.0  # seconds of low load before an engine is removed
    replicas_per_node: int | None = None

    @classmethod
    def of(cls, settings: GatewaySettings) -> Scaling:
        """The scaling the settings ask for (serve --replicas, --max-replicas, ...)."""
        return cls(
            settings.replicas,
            settings.max_replicas,
            settings.target_requests,
            settings.scale_down_delay,
            settings.replicas_per_node,
        )

    def options(self) -> dict:
        """The EngineHost deployment's options for this scaling."""
        options: dict = {}
        if self.replicas_per_node:
            options["max_replicas_per_node"] = self.replicas_per_node
        if not self.max_replicas or self.max_replicas <= self.replicas:
            return options | {"num_replicas": self.replicas}
        return options | {
            "autoscaling_config": {
                "min_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_requests,
                "metrics_interval_s": 1.0,
                "look_back_period_s": 5.0,
                "upscale_delay_s": 2.0,
                "downscale_delay_s": self.scale_down_delay,
                "policy": {"policy_function": engine_load_policy},
            }
        }


def engine_load_policy(ctx: AutoscalingContext) -> tuple[int, dict]:
    """Engines for a base from the requests its engines hold (running + waiting, each replica reading
    its own engine): Ray counts none of them, since the gateway sends them to the engines directly.
    Ray applies the min/max bounds and the up/down delays to what this returns."""
    load = sum((ctx.aggregated_metrics or {}).get("engine_requests", {}).values())
    target = ctx.config.target_ongoing_requests if ctx.config else 8.0
    return max(1, math.ceil(load / (target or 8.0))), {}


async def engine_requests(url: str) -> float:
    """Requests an engine is running or holding in its queue, from its own /metrics."""
    async with httpx.AsyncClient(timeout=5.0) as http:
        text = (await http.get(url + "/metrics")).text
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(names))


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # the engine subprocess does the work; do not reserve Ray CPUs
    health_check_period_s=1.0,
    health_check_timeout_s=30.0,
    graceful_shutdown_timeout_s=120.0,  # the drain below: requests the gateway sent still finish
)
class EngineHost:
    """One vLLM engine of one base on this replica's node; says where it is, and whether it lives."""

    async def __init__(self, base_json: str, settings_json: str):
        context = serve.get_replica_context()
        base = BaseRecord.model_validate_json(base_json)
        settings = GatewaySettings.model_validate_json(settings_json)
        rank, local, world = context.rank.rank, context.rank.local_rank, context.world_size
        here = node_dir()
        os.environ.setdefault("DELTAGATE_ARTIFACT_CACHE", str(here / "artifact-cache"))  # one per node
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # replicas on one machine split its cores
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores_for(local, world, sorted(os.sched_getaffinity(0)))
        # A replacement replica gets its rank, and so its pid file: what is left of the dead
        # replica's engine is stopped before the new one starts (EngineProcess.start).
        logs = here / f"{context.app_name}-{rank}"
        logs.mkdir(parents=True, exist_ok=True)
        local_settings = settings.model_copy(update={"state_dir": here})
        host = ray.util.get_node_ip_address()  # reachable from the gateway's node
        spec = managed_spec(settings, base, logs / "engine", local_settings.engine_env(), host)
        self.proc = EngineProcess(spec)
        self.id = f"{base.name}@{context.replica_id.unique_id}"
        node = ray.get_runtime_context().get_node_id()
        self.entry = {"group": base.name, "app": context.app_name, "node": node}
        self.directory = directory()
        self.leaving = False
        cores = os.environ["VLLM_CPU_OMP_THREADS_BIND"]
        log.info("replica %s: engine for %s on cores %s", self.id, base.name, cores)
        self.proc.start()
        await asyncio.to_thread(self.proc.wait_ready, settings.engine_start_timeout)
        self.entry.update(url=self.proc.url, pid=self.proc.proc.pid)
        await self.directory.announce.remote(self.id, self.entry)

    async def check_health(self) -> None:
        """Ray's health check: the engine must be alive (else Ray replaces this replica). Also the
        heartbeat in the directory; a directory being restarted does not make the engine unhealthy."""
        if not self.proc.alive():
            await self._tell(self.directory.withdraw.remote(self.id))
            raise RuntimeError("the vLLM engine of this replica exited")
        if not self.leaving:
            await self._tell(self.directory.announce.remote(self.id, self.entry))

    async def _tell(self, call) -> None:
        """A call to the directory; one that is restarting does not make this replica unhealthy."""
        try:
            await asyncio.wait_for(call, 5.0)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.warning("replica %s: the engine directory did not answer (%s)", self.id, exc)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray's autoscaler reads this every metrics interval (engine_load_policy sums it)."""
        return {"engine_requests": await engine_requests(self.proc.url)}

    async def __call__(self) -> dict:
        return {"id": self.id, **self.entry}

    async def __del__(self) -> None:
        """Removed (scaled down, deleted): leave the directory, let what the gateway already sent
        finish (it sees the engine gone within its next read, 1 s), then stop the engine."""
        self.leaving = True
        try:
            await self._tell(self.directory.withdraw.remote(self.id))
            await asyncio.sleep(2.0)
            deadline = time.monotonic() + 100.0
            while self.proc.alive() and time.monotonic() < deadline:
                try:
                    if await engine_requests(self.proc.url) == 0:
                        break
                except (httpx.HTTPError, ValueError, IndexError):
                    break
                await asyncio.sleep(0.5)
        finally:
            await asyncio.to_thread(self.proc.stop)


# Serve application states a restarted gateway keeps as they are. UNHEALTHY is what a replica that
# failed its health check (a killed engine) makes of the application until Serve has replaced it.
KEEP = ("RUNNING", "DEPLOYING", "UNHEALTHY")


class RayPool(EnginePool):
    """A Ray Serve application per base (EngineHost × replicas); engines found through the directory."""

    remote_paths = True

    def __init__(self, settings: GatewaySettings, scaling: Scaling):
        super().__init__()
        self.settings = settings
        self.scaling = scaling
        self.directory = directory()
        self.gateway = f"{socket.gethostname()}:{settings.state_dir.resolve()}"  # same after a restart
        self.instance = uuid.uuid4().hex
        # This gateway's applications (and its engines' pid files on every node) start with this.
        self.prefix = f"deltagate-engines-{hashlib.sha256(self.gateway.encode()).hexdigest()[:8]}-"
        self._apps: dict[str, str] = {}  # base -> its Serve application
        self._up: dict[str, Endpoint] = {}
        self._dead: set[str] = set()  # found dead by a request, before the directory says so
        self._reader: asyncio.Task | None = None

    def app_name(self, base: str) -> str:
        return self.prefix + base.replace("/", "-")

    async def start(self, bases: list[BaseRecord], on_dead: OnDead) -> None:
        await self._drive(wait=HEARTBEAT_STALE + 1.0)
        await asyncio.gather(*(self._deploy(b) for b in bases))
        await self._read()
        self._reader = asyncio.create_task(self._follow())

    async def _deploy(self, base: BaseRecord) -> None:
        """Run `base`'s application and wait until its first replica's engine is up."""
        name = self._apps[base.name] = self.app_name(base.name)
        running = await asyncio.to_thread(serve.status)
        if name in running.applications and running.applications[name].status in KEEP:
            # A gateway restarted on a running cluster (its predecessor killed): keep the engines,
            # and the weights they hold, rather than redeploying (a new code version restarts them).
            # Also while Serve replaces a dead replica: a redeploy would restart the live ones too.
            log.info("engine replicas of %s are running on Ray already; using them", base.name)
            await self._wait_for(base.name)
            return
        app = EngineHost.options(**self.scaling.options()).bind(
            base.model_dump_json(), self.settings.model_dump_json()
        )
        log.info("starting engine replicas of %s on Ray (%s)", base.name, self.scaling)
        await asyncio.to_thread(serve.run, app, name=name, route_prefix=None, blocking=False)
        await self._wait_for(base.name)

    async def _wait_for(self, base: str) -> None:
        deadline = time.monotonic() + self.settings.engine_start_timeout
        while not any(e.group == base for e in self._up.values()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no engine replica of {base!r} started within the start timeout")
            await asyncio.sleep(1.0)
            await self._read()

    async def _read(self) -> None:
        answer = await self.directory.list.remote()
        listed = answer["engines"]
        up = {
            id: Endpoint(id, e["group"], e["url"], e.get("pid"), e.get("node", ""))
            for id, e in listed.items()
            if id not in self._dead and e.get("app") in self._apps.values()  # this gateway's only
        }
        if time.time() - answer["started"] < REFILL_SECONDS:  # a restarted directory, still refilling:
            up = {**{i: e for i, e in self._up.items() if i not in self._dead}, **up}  # keep what we knew
        self._dead &= set(listed)  # forget the dead once the directory has dropped them too
        if up.keys() != self._up.keys():
            self.changed.set()
        self._up = up

    async def _drive(self, wait: float = 0.0) -> None:
        """Heartbeat this process as the one running this gateway (host and state dir). At start it
        waits out a predecessor's last heartbeat (one killed a moment ago); a running one refuses."""
        give_up = time.monotonic() + wait
        while not await self.directory.drive.remote(self.gateway, self.instance):
            if time.monotonic() > give_up:
                raise BadRequestError(
                    f"another deltagate process runs gateway {self.gateway} on this Ray cluster; "
                    "give each gateway a state dir of its own (--state-dir)"
                )
            await asyncio.sleep(1.0)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._drive()
                await self._read()
            except Exception:
                log.exception("reading the engine directory failed; trying again")

    def endpoints(self) -> list[Endpoint]:
        return list(self._up.values())

    def groups(self) -> set[str]:
        return set(self._apps)

    def can_launch(self) -> bool:
        return True

    async def launch(self, base: BaseRecord) -> None:
        await self._deploy(base)

    async def remove(self, group: str) -> None:
        name = self._apps.pop(group, None)
        if name is not None:
            await asyncio.to_thread(serve.delete, name)
        self._up = {i: e for i, e in self._up.items() if e.group != group}

    async def died(self, id: str, within: float = 2.0) -> bool:
        """Ask the engine itself: a replica's death reaches the directory only at its next check."""
        endpoint = self._up.get(id)
        if endpoint is None:
            return True
        give_up = time.monotonic() + within
        async with httpx.AsyncClient(timeout=1.0) as http:
            while time.monotonic() < give_up:
                try:
                    await http.get(endpoint.url + "/health")
                except httpx.HTTPError:
                    self._dead.add(id)
                    self._up.pop(id, None)
                    self.changed.set()
                    return True
                await asyncio.sleep(0.1)
        return False

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        for name in self._apps.values():
            await asyncio.to_thread(serve.delete, name)
