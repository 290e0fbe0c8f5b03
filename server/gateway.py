"""The gateway service: the engines (started, attached, supervised), their swap slots, and which
engine and weights serve each request. Deltas and variants are catalogued by server/catalog.py."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from deltas.checkpoint import Checkpoint
from deltas.recipe import Recipe
from deltas.store import is_uri, use_cache
from loaders.engine import EngineClient, EngineError, EngineProcess, EngineSpec, cores_for, wait_healthy
from server.adapters import Adapter, AdapterLane
from server.bases import Provenance, describe_base, place, provenance
from server.catalog import Catalog, drop_partial_uploads, eos_ids, require_name
from server.errors import BadRequestError, ConflictError, NotFoundError, UnavailableError
from server.metrics import EngineState, Metrics
from server.policy import SwapPolicy
from server.registry import (
    BaseRecord,
    Registry,
    VariantRecord,
    file_identity,
)
from server.settings import GatewaySettings
from server.swap import WeightSlot

log = logging.getLogger("deltagate")


@dataclass(frozen=True)
class Resolved:
    """Where and how to serve one request for a model name."""

    variant: VariantRecord
    recipe: Recipe
    slot: WeightSlot | None  # None on a front whose engines are elsewhere (server/cluster)
    chat_template: str | None
    stop_token_ids: list[int]
    adapter: Adapter | None = None  # served as this LoRA adapter on the plain base, not by a swap
    engine: str = ""  # the engine's name: the base it was started on (a runtime base may be hosted)

    @property
    def engine_model(self) -> str:
        """The model name the engine serves this request under (and puts in its answers)."""
        return self.adapter.name if self.adapter else self.engine  # engines serve their base's name


class Gateway:
    """Owns the registry, the engines (one per base) and their weight slots."""

    def __init__(self, settings: GatewaySettings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.registry = Registry(settings.registry_path)
        self.processes: dict[str, EngineProcess] = {}
        self.slots: dict[str, WeightSlot] = {}
        self._engine_urls: dict[str, str] = {}
        self._supervisor: asyncio.Task | None = None
        self._base_eos: dict[str, set[int]] = {}
        self._base_template: dict[str, str | None] = {}
        self._starting: dict[str, asyncio.Task] = {}  # runtime bases whose own engine is starting
        self._restarting: set[str] = set()  # managed engines the supervisor is restarting
        self._wake = asyncio.Event()  # look at the engines now, not at the supervisor's next tick
        self.remote = False
        lanes = settings.state_dir / "adapters"
        self.adapters = AdapterLane(lanes, settings.lora_slots, settings.max_lora_rank)
        self.catalog = Catalog(self.registry, settings, self.adapters)

    # lifecycle ---------------------------------------------------------
    async def start(self, *, engines: bool = True) -> None:
        """Register configured bases, start or attach their engines, wait until ready.

        engines=False: only the registry (bases, start-up variants), for a front whose engines are
        Ray Serve replicas (server/cluster); requests then resolve without a slot.
        """
        self.remote = not engines
        drop_partial_uploads(self.settings.store_dir)
        use_cache(self.settings.artifact_cache())  # stored artifacts: the cache this node's engines use
        for spec in self.settings.bases:
            require_name(spec.name)
            if not (Path(spec.path) / "config.json").is_file():
                raise BadRequestError(f"base {spec.name!r}: {spec.path} is not a checkpoint dir")
            previous = self.registry.state.bases.get(spec.name)
            record = await asyncio.to_thread(describe_base, spec.name, Path(spec.path).resolve(), previous)
            self.registry.put_base(record)  # the command line wins over a runtime base of that name
        bases = list(self.registry.state.bases.values())
        if not bases:
            raise BadRequestError("no base model configured; pass --base DIR")
        for base in bases:
            self._remember(base)
        if not engines:
            for spec in self.settings.variants:
                await self.catalog.ensure_variant(spec)
            return
        # Engine URLs are runtime facts, given per start; they are not persisted.
        self._engine_urls = {s.name: s.engine_url for s in self.settings.bases if s.engine_url}
        own = [b for b in bases if b.engine is None]  # the others are hot-loaded by one of these
        launched = [b for b in own if b.name not in self._engine_urls]
        for i, base in enumerate(launched):
            self.processes[base.name] = self._launch(base, i, len(launched))
        await asyncio.gather(
            *(asyncio.to_thread(p.wait_ready, self.settings.engine_start_timeout)
              for p in self.processes.values())
        )  # fmt: skip
        for base in own:
            await self._attach(base)
        for base in bases:
            if base.engine is not None and base.engine not in self.slots:
                log.warning("runtime base %s: its engine %s is not configured now", base.name, base.engine)
        for spec in self.settings.variants:
            await self.catalog.ensure_variant(spec)
        if self.processes and self.settings.supervise_seconds > 0:
            self._supervisor = asyncio.create_task(self._supervise())

    def _remember(self, base: BaseRecord) -> None:
        """Cache what requests need from a base's checkpoint: its stop tokens and chat template."""
        ckpt = Checkpoint(base.path)
        self._base_eos[base.name] = set(eos_ids(ckpt.generation_config()))
        self._base_template[base.name] = ckpt.chat_template()

    def _launch(self, base: BaseRecord, index: int, count: int) -> EngineProcess:
        """Start engine `index` of `count` on this machine for `base` (returns before it is ready)."""
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(self.settings.engine_env())
        if count > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # CPU engines: a share each
            env["VLLM_CPU_OMP_THREADS_BIND"] = cores_for(index, count, sorted(os.sched_getaffinity(0)))
        spec = EngineSpec(
            model=base.path,
            served_name=base.name,
            max_model_len=self.settings.max_model_len,
            kv_cache_gib=self.settings.kv_cache_gib,
            extra_args=tuple(self.settings.engine_args) + self._lora_args(),
            log_path=self.settings.log_dir / f"engine-{base.name.replace('/', '_')}.log",
            pid_path=self.settings.log_dir / f"engine-{base.name.replace('/', '_')}.pgid",
            env=tuple(env.items()),
        )
        proc = EngineProcess(spec)
        proc.start()
        log.info("starting engine for base %s on port %d (log: %s)", base.name, proc.port, spec.log_path)
        return proc

    def _lora_args(self) -> tuple[str, ...]:
        if not self.settings.lora_slots or "--enable-lora" in self.settings.engine_args:
            return ()
        return ("--enable-lora", "--max-loras", str(self.settings.lora_slots),
                "--max-lora-rank", str(self.settings.max_lora_rank))  # fmt: skip

    async def _attach(self, base: BaseRecord) -> None:
        url = self._engine_urls.get(base.name) or self.processes[base.name].url
        if base.name in self._engine_urls:  # an engine started by someone else may still be starting
            await asyncio.to_thread(
                wait_healthy, url, None, self.settings.engine_wait, f"engine for {base.name!r}"
            )
        client = EngineClient(
            url, served_name=base.name, read_timeout=self.settings.engine_read_timeout or None
        )
        resident = Recipe(base=base.path)
        current = await client.current_recipe()
        if current is not None:
            resident = Recipe.model_validate_json(current)
        on_swap = lambda record: self.metrics.observe_swap(base.name, record)  # noqa: E731
        policy = SwapPolicy(self.settings.swap_quantum, self.settings.swap_max_wait)
        self.slots[base.name] = WeightSlot(client, resident, on_swap=on_swap, policy=policy)

    async def _supervise(self) -> None:
        """Restart managed engines that exit; a restarted engine holds its plain base again."""
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.supervise_seconds)
            except TimeoutError:
                pass
            self._wake.clear()
            for name, proc in list(self.processes.items()):
                if proc.alive() or name not in self.slots:  # not attached yet: its start-up reports it
                    continue
                log.error("engine for base %s exited (code %s); restarting it", name, proc.proc.returncode)
                self.metrics.engine_restarts.labels(name).inc()

                async def restart(proc: EngineProcess = proc, name: str = name) -> None:
                    self.adapters.forget(name)
                    proc.start()
                    await asyncio.to_thread(proc.wait_ready, self.settings.engine_start_timeout)

                self._restarting.add(name)
                try:
                    await self.slots[name].replace_engine(restart, Recipe(base=self.registry.base(name).path))
                except Exception:
                    log.exception("restarting the engine for base %s failed; will retry", name)
                    continue
                finally:
                    self._restarting.discard(name)
                log.info("engine for base %s is back on %s", name, proc.url)

    @property
    def supervised(self) -> bool:
        """Whether dead managed engines are restarted here (not so on a Ray replica: Ray replaces it)."""
        return self._supervisor is not None

    def engine_down(self, engine: str) -> bool:
        """Whether the managed engine `engine` is dead or being restarted."""
        proc = self.processes.get(engine)
        return engine in self._restarting or (proc is not None and engine in self.slots and not proc.alive())

    async def engine_died(self, engine: str, within: float = 2.0) -> bool:
        """After a connection error: whether the managed engine is (or within `within` s turns out to
        be) dead. Its sockets close while the process exits, a moment before it can be seen exited."""
        give_up = time.monotonic() + within
        while not self.engine_down(engine):
            if engine not in self.processes or time.monotonic() >= give_up:
                return False
            await asyncio.sleep(0.05)
        return True

    async def wait_for_engine(self, engine: str, deadline: float) -> None:
        """Wait until a dead managed engine is back, or 503 (with Retry-After) at `deadline` (monotonic).

        Requests that arrive while an engine restarts wait for it instead of failing at once.
        """
        self._wake.set()
        while self.engine_down(engine):
            if time.monotonic() >= deadline:
                raise UnavailableError(
                    f"the engine for {engine!r} stopped and is being restarted; retry shortly "
                    f"(requests wait up to {self.settings.engine_wait:g} s: serve --engine-wait)"
                )
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        for task in self._starting.values():
            task.cancel()
        for slot in self.slots.values():
            await slot.client.close()
        for proc in self.processes.values():
            await asyncio.to_thread(proc.stop)

    # resolving ---------------------------------------------------------
    def resolve(self, model: str) -> Resolved:
        """The variant, recipe and engine slot serving `model`."""
        variant = self.registry.variant(model)
        base = self.registry.base(variant.base)
        engine = self.engine_of(base)
        template, stops = None, []
        for term in variant.deltas:
            record = self.registry.delta(term.delta)
            stored = is_uri(record.path)  # a stored artifact never changes; a file may
            if not stored and _identity_or_none(record.path) != (record.size_bytes, record.mtime_ns):
                raise ConflictError(
                    f"delta {record.name!r}: {record.path} is missing or changed since it was registered; "
                    "register it again"
                )
            template = template or record.chat_template
            stops += record.eos_token_ids  # the post model's end-of-turn tokens
        if engine != base.name:  # a hosted base: the engine speaks with its own base's template and stops
            template = template or self._base_template[base.name]
            stops += sorted(self._base_eos[base.name])
        engine_stops = self._base_eos.get(engine, set())  # the engine stops on these by itself
        eos = [e for e in dict.fromkeys(stops) if e not in engine_stops]
        slot = self.slots.get(engine)
        if slot is None and not self.remote:
            if engine in self._starting:
                raise UnavailableError(f"the engine for base {base.name!r} is starting; retry shortly")
            raise NotFoundError(f"base {base.name!r} has no running engine")
        recipe = self.catalog.recipe(variant)
        return Resolved(variant, recipe, slot, template, eos, self._adapter(variant, recipe), engine)

    def engine_of(self, base: BaseRecord) -> str:
        """The engine serving `base`: its own, or the one that hot-loads it."""
        return base.engine or base.name

    def slot_of(self, base: str) -> WeightSlot | None:
        """The weight slot of the engine serving base `base` (None: no engine running)."""
        return self.slots.get(self.engine_of(self.registry.base(base)))

    def _adapter(self, variant: VariantRecord, recipe: Recipe) -> Adapter | None:
        """The adapter serving `variant`, if its lane is the adapter one."""
        if self._not_adapter(variant) is not None:
            return None
        return self.adapters.adapter(variant, recipe, self.catalog.deltas_of(variant))

    def _not_adapter(self, variant: VariantRecord) -> str | None:
        """Why `variant` is served by swaps rather than as an adapter (None: it is an adapter)."""
        if variant.lane == "swap":
            return "its lane is swap"
        return self.adapters.unfit(variant, self.catalog.deltas_of(variant))

    def lane(self, name: str) -> tuple[str, str | None]:
        """How `name` is served ("swap" or "adapter") and, if not as an adapter, why."""
        why = self._not_adapter(self.registry.variant(name))
        return ("swap", why) if why else ("adapter", None)

    async def admit(self, target: Resolved) -> None:
        """Count a request in on its weights: its variant resident, or the plain base + its adapter."""
        slot, adapter = target.slot, target.adapter
        if adapter is None:
            await slot.acquire(target.variant.name, target.recipe)
            return
        await self.adapters.prepare(adapter)
        # Not in one batch with plain requests: on vLLM CPU, plain rows batched with LoRA rows were
        # seen answering differently (a logprob 0.17 off, a greedy token flipped; README).
        await slot.acquire(target.variant.base, Recipe(base=target.recipe.base), lane="adapters")
        try:
            await self.adapters.load(target.engine, slot.client, adapter)
        except BaseException:
            slot.release()
            raise

    def model_names(self) -> list[str]:
        return self.registry.model_names()

    def default_model(self) -> str:
        """The model a request that names none means: the base, when there is exactly one."""
        if len(self.slots) != 1:
            bases = ", ".join(self.slots)
            raise BadRequestError(f"name a 'model': this gateway serves several bases ({bases})")
        return next(iter(self.slots))

    def engine_states(self) -> list[EngineState]:
        """Per engine: resident variant, every model name it serves, requests in flight (for /metrics)."""
        served: dict[str, list[str]] = {name: [] for name in self.slots}
        for b in self.registry.state.bases.values():
            served.setdefault(self.engine_of(b), []).append(b.name)
        for v in self.registry.state.variants.values():
            served.setdefault(self.engine_of(self.registry.base(v.base)), []).append(v.name)
        return [
            EngineState(
                name,
                slot.resident_variant or _base_if_plain(slot, name),
                tuple(served[name]),
                slot.inflight,
                sum(slot.queued().values()),
            )  # fmt: skip
            for name, slot in self.slots.items()
        ]

    # bases -------------------------------------------------------------
    async def add_base(self, name: str, path: str) -> BaseRecord:
        """Check a checkpoint and serve it: hot-loaded by a running engine it fits, else its own."""
        require_name(name)
        self.catalog.name_free(name)
        resolved = Path(path).expanduser().resolve()
        if not (resolved / "config.json").is_file():
            raise BadRequestError(f"base {name!r}: {path!r} is not a checkpoint directory (no config.json)")
        record = await asyncio.to_thread(describe_base, name, resolved)
        engines = {e: self.registry.base(e).path for e in self.slots}
        host, reasons = await asyncio.to_thread(place, resolved, engines)
        if host is None and (self._engine_urls or self.remote):
            why = "; ".join(f"engine {e!r}: {r}" for e, r in reasons.items())
            raise BadRequestError(
                f"base {name!r} fits no running engine ({why}); this gateway is attached to engines it "
                f"did not start, so start a vLLM engine for it and pass --base {name}=DIR@URL"
            )
        self.catalog.name_free(name)  # again: another request may have taken it while we read the checkpoint
        record = record.model_copy(update={"engine": host, "runtime": True})
        self.registry.put_base(record)
        self._remember(record)
        if host is None:
            log.info("base %s fits no running engine (%s); starting one", name, reasons)
            self._start_engine(record)
        else:
            log.info("base %s is hot-loaded by the engine of %s", name, host)
        return record

    def _start_engine(self, base: BaseRecord) -> None:
        """Start an engine of its own for a runtime base; requests get 503 until it is ready."""
        proc = self._launch(base, len(self.processes), len(self.processes) + 1)
        self.processes[base.name] = proc

        async def ready() -> None:
            try:
                await asyncio.to_thread(proc.wait_ready, self.settings.engine_start_timeout)
                await self._attach(base)
            except Exception:
                log.exception("the engine for base %s did not start; see %s", base.name, proc.spec.log_path)
                self.processes.pop(base.name, None)
                await asyncio.to_thread(proc.stop)
            finally:
                self._starting.pop(base.name, None)

        self._starting[base.name] = asyncio.create_task(ready())

    def base_state(self, name: str) -> str:
        """ready | starting | no engine, for GET /v1/bases."""
        engine = self.engine_of(self.registry.base(name))
        if engine in self.slots:
            return "ready"
        return "starting" if engine in self._starting else "no engine"

    def provenance(self, delta: str, base: str) -> Provenance:
        """Whether `delta` was extracted on `base` (exact) or on another base (transferred)."""
        return provenance(self.registry.delta(delta), self.registry.base(base))

    async def delete_base(self, name: str) -> None:
        """Forget a runtime base (409 while variants or other bases use it); stop its own engine."""
        record = self.registry.base(name)
        if not record.runtime:
            raise ConflictError(f"base {name!r} was given on the command line; restart without it")
        hosted = [b.name for b in self.registry.state.bases.values() if b.engine == name]
        if hosted:
            raise ConflictError(f"base {name!r}'s engine also serves bases {hosted}; delete them first")
        self.registry.remove_base(name)
        task = self._starting.pop(name, None)
        if task is not None:
            task.cancel()
        slot = self.slots.pop(name, None)
        if slot is not None:
            await slot.client.close()
        proc = self.processes.pop(name, None)
        if proc is not None:
            await asyncio.to_thread(proc.stop)

    async def delete_variant(self, name: str) -> None:
        """Forget a variant; an adapter it was served as is unloaded and its files deleted."""
        try:
            target = self.resolve(name) if name in self.registry.state.variants else None
        except ConflictError:  # its delta file changed: no adapter of it can have been loaded since
            target = None
        self.registry.remove_variant(name)
        if target is not None and target.adapter is not None:
            try:
                await self.adapters.unload(target.engine, target.slot.client, target.adapter)
            except EngineError:
                log.warning("could not unload %s; the engine forgets it on restart", target.adapter.name)


def _base_if_plain(slot: WeightSlot, base: str) -> str | None:
    """Before any request, an engine holds its plain base (unless attached with other weights)."""
    return base if not slot.resident.deltas and not slot.resident.base.startswith("<") else None


def _identity_or_none(path: str) -> tuple[int, int] | None:
    try:
        return file_identity(path)
    except OSError:
        return None
