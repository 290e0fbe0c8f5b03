"""Where a gateway's engines run: the one interface behind every deployment, and its local kind.

The gateway (server/gateway.py) owns what is the same everywhere — registry, weight slots, which
engine serves a request, the relay — and asks an EnginePool only for engines: start them for
bases, say which are up (an Endpoint per engine: its id, the base it was started on, its URL),
start one for a runtime base, stop them. Two pools:

- LocalPool (here): engine processes on this machine, or engines someone else started
  (`--base NAME=DIR --engine-url NAME=URL`); a dead managed engine is restarted in place (same id,
  same port), with the slot's admissions blocked meanwhile (WeightSlot.replace_engine).
- RayPool (server/cluster/pool.py): one Ray Serve deployment per base, a replica per engine; Ray
  places them on the cluster's nodes and replaces a replica whose engine died (a new id, URL).

The token stream goes from the gateway to the admitted engine directly in both: the pool is the
control plane only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from loaders.engine import EngineProcess, EngineSpec, cores_for, lora_refusal, wait_healthy
from server.registry import BaseRecord
from server.settings import GatewaySettings

log = logging.getLogger("deltagate")

Restart = Callable[[], Awaitable[None]]
# How a pool asks the gateway to restart engine `id` in place: the gateway runs `restart` with
# that engine's admissions blocked (WeightSlot.replace_engine).
OnDead = Callable[[str, Restart], Awaitable[None]]


@dataclass(frozen=True)
class Endpoint:
    """One running engine: `id` is unique in the pool; `group` is the base it was started on."""

    id: str
    group: str
    url: str
    pid: int | None = None  # the engine's API server process, where the pool knows it
    node: str = ""  # where it runs (a Ray node id; "" on this machine)


def managed_spec(
    settings: GatewaySettings, base: BaseRecord, stem: Path, env: dict[str, str], host: str = "127.0.0.1"
) -> EngineSpec:
    """How a gateway starts an engine for `base`, wherever it runs: its flags, environment, and its
    log and pid files at `stem`.log / `stem`.pgid."""
    refusal = lora_refusal(base.path)
    if refusal and settings.lora_slots:
        log.warning("base %s: %s (its low-rank variants are served by swaps)", base.name, refusal)
    return EngineSpec(
        model=base.path,
        served_name=base.name,
        host=host,
        max_model_len=settings.max_model_len,
        kv_cache_gib=settings.kv_cache_gib,
        extra_args=settings.engine_flags(base.tool_parser, lora=refusal is None),
        log_path=stem.parent / f"{stem.name}.log",  # not with_suffix: base names may hold dots
        pid_path=stem.parent / f"{stem.name}.pgid",
        env=tuple(env.items()),
        mock_tokens_per_second=settings.mock_engine_tps,
    )


class EnginePool(ABC):
    """Starts, watches and stops the engines of a gateway; knows nothing of weights or requests."""

    supervised = False  # True: a dead engine is restarted in place (same id): requests wait for it
    remote_paths = False  # True: engines may run on machines that cannot read this one's files

    def __init__(self) -> None:
        self.changed = asyncio.Event()  # set when engines came or went (the gateway re-attaches)

    @abstractmethod
    async def start(self, bases: list[BaseRecord], on_dead: OnDead) -> None:
        """Start (or find) the engines of `bases`; return once each base has one ready."""

    @abstractmethod
    def endpoints(self) -> list[Endpoint]:
        """The engines that are up now."""

    @abstractmethod
    def groups(self) -> set[str]:
        """The bases that have engines here, up or not (requests for them wait rather than 404)."""

    @abstractmethod
    def can_launch(self) -> bool:
        """Whether a runtime base may get an engine of its own here."""

    @abstractmethod
    async def launch(self, base: BaseRecord) -> None:
        """Start an engine for runtime base `base`; return once it is ready (raise if it never is)."""

    @abstractmethod
    async def remove(self, group: str) -> None:
        """Stop every engine started on base `group`."""

    def down(self, id: str) -> bool:
        """Whether engine `id` is dead or being restarted."""
        return id not in {e.id for e in self.endpoints()}

    async def died(self, id: str, within: float = 2.0) -> bool:
        """After a connection error: whether engine `id` is (or within `within` s turns out to be)
        dead. A killed engine resets connections a moment before it can be seen exited."""
        give_up = time.monotonic() + within
        while not self.down(id):
            if time.monotonic() >= give_up:
                return False
            await asyncio.sleep(0.05)
        return True

    def wake(self) -> None:  # noqa: B027 (most pools have nothing to wake)
        """Look at the engines now (a request found one dead), not at the next tick."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop every engine this pool started."""


class LocalPool(EnginePool):
    """Engine processes on this machine (one per base, on a share of the cores), supervised; and
    engines started by someone else, attached by URL (never restarted from here)."""

    supervised = True

    def __init__(self, settings: GatewaySettings):
        super().__init__()
        self.settings = settings
        self.processes: dict[str, EngineProcess] = {}
        self._urls = {s.name: s.engine_url for s in settings.bases if s.engine_url}  # attached
        self._restarting: set[str] = set()
        self._launching: set[str] = set()  # runtime bases whose engine is starting (launch reports it)
        self._supervisor: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._on_dead: OnDead | None = None

    async def start(self, bases: list[BaseRecord], on_dead: OnDead) -> None:
        self._on_dead = on_dead
        launched = [b for b in bases if b.name not in self._urls]
        for i, base in enumerate(launched):
            self.processes[base.name] = self._launch(base, i, len(launched))
        timeout = self.settings.engine_start_timeout
        await asyncio.gather(*(asyncio.to_thread(p.wait_ready, timeout) for p in self.processes.values()))
        for name in [b.name for b in bases if b.name in self._urls]:  # may still be starting
            what = f"engine for {name!r}"
            await asyncio.to_thread(wait_healthy, self._urls[name], None, self.settings.engine_wait, what)
        if self.processes and self.settings.supervise_seconds > 0:
            self._supervisor = asyncio.create_task(self._supervise())

    def endpoints(self) -> list[Endpoint]:
        up = [Endpoint(name, name, url) for name, url in self._urls.items()]
        for name, proc in self.processes.items():
            if name not in self._restarting and name not in self._launching and proc.port:
                up.append(Endpoint(name, name, proc.url, proc.proc.pid if proc.proc else None))
        return up

    def groups(self) -> set[str]:
        return set(self.processes) | set(self._urls)

    def down(self, id: str) -> bool:
        proc = self.processes.get(id)
        return id in self._restarting or (proc is not None and not proc.alive())

    async def died(self, id: str, within: float = 2.0) -> bool:
        if id not in self.processes:  # an attached engine: not ours to watch
            return False
        return await super().died(id, within)

    def wake(self) -> None:
        self._wake.set()

    def can_launch(self) -> bool:
        return not self._urls  # attached to engines it did not start: it starts none either

    async def launch(self, base: BaseRecord) -> None:
        proc = self._launch(base, len(self.processes), len(self.processes) + 1)
        self.processes[base.name] = proc
        self._launching.add(base.name)
        try:
            await asyncio.to_thread(proc.wait_ready, self.settings.engine_start_timeout)
        except BaseException:
            log.exception("the engine for base %s did not start; see %s", base.name, proc.spec.log_path)
            self.processes.pop(base.name, None)
            await asyncio.to_thread(proc.stop)
            raise
        finally:
            self._launching.discard(base.name)

    async def remove(self, group: str) -> None:
        proc = self.processes.pop(group, None)
        if proc is not None:
            await asyncio.to_thread(proc.stop)

    def _launch(self, base: BaseRecord, index: int, count: int) -> EngineProcess:
        """Start engine `index` of `count` on this machine for `base` (returns before it is ready)."""
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(self.settings.engine_env())
        if count > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # CPU engines: a share each
            env["VLLM_CPU_OMP_THREADS_BIND"] = cores_for(index, count, sorted(os.sched_getaffinity(0)))
        stem = self.settings.log_dir / f"engine-{base.name.replace('/', '_')}"
        spec = managed_spec(self.settings, base, stem, env)
        proc = EngineProcess(spec)
        proc.start()
        log.info("starting engine for base %s on port %d (log: %s)", base.name, proc.port, spec.log_path)
        return proc

    async def _supervise(self) -> None:
        """Restart managed engines that exit; a restarted engine holds its plain base again."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.supervise_seconds)
            except TimeoutError:
                pass
            self._wake.clear()
            for name, proc in list(self.processes.items()):
                if proc.alive() or name in self._restarting or name in self._launching:
                    continue
                log.error("engine for base %s exited (code %s); restarting it", name, proc.proc.returncode)

                async def restart(proc: EngineProcess = proc) -> None:
                    proc.start()
                    await asyncio.to_thread(proc.wait_ready, self.settings.engine_start_timeout)

                self._restarting.add(name)
                try:
                    await self._on_dead(name, restart)
                except Exception:
                    log.exception("restarting the engine for base %s failed; will retry", name)
                    continue
                finally:
                    self._restarting.discard(name)
                log.info("engine for base %s is back on %s", name, proc.url)

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        for proc in self.processes.values():
            await asyncio.to_thread(proc.stop)
