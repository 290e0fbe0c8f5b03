"""The gateway service: the weight slot of every engine, and which engine and weights serve each
request. Engines are started and watched by its pool (server/pool.py); deltas and variants are
catalogued by server/catalog.py."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from deltas import Checkpoint, Recipe
from deltas.store import use_cache
from loaders.engine import EngineClient, EngineError, check_tool_parser
from server.adapters import AdapterLane
from server.admission import Admission
from server.bases import Provenance, describe_base, place, provenance
from server.catalog import Catalog, drop_partial_uploads, eos_ids, require_name
from server.errors import BadRequestError, ConflictError, NotFoundError, UnavailableError
from server.metrics import EngineState, Metrics
from server.policy import SwapPolicy
from server.pool import Endpoint, EnginePool, LocalPool, Restart
from server.quota import Quotas, RateStore
from server.registry import BaseRecord, Registry
from server.resolver import Resolver, Target
from server.settings import GatewaySettings
from server.stored import StoredResponses
from server.swap import UnknownWeights, WeightSlot
from server.tenancy import ROOT, Keys, KeyStore, Principal
from server.usage import Usage, UsageStore

log = logging.getLogger("deltagate")


class Gateway:
    """Owns the registry, the weight slot of every engine, and which engine serves a request; the
    engines themselves (where they run, their start and restart) are its pool's (server/pool.py)."""

    def __init__(
        self, settings: GatewaySettings, metrics: Metrics, registry: Registry, pool: EnginePool | None = None
    ):
        self.settings = settings
        self.metrics = metrics
        self.registry = registry
        self.pool = pool or LocalPool(settings)
        self.slots: dict[str, WeightSlot] = {}  # engine id -> its slot; slot.group: its base
        self._base_info: dict[str, tuple[set[int], str | None]] = {}  # base -> stop tokens, chat template
        self._starting: dict[str, asyncio.Task] = {}  # runtime bases whose own engine is starting
        self._watcher: asyncio.Task | None = None
        self._follower: asyncio.Task | None = None
        self._usage_writer: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()  # slots of engines gone, closed once their requests end
        self._sync_lock = asyncio.Lock()
        lanes = settings.state_dir / "adapters"
        self.adapters = AdapterLane(lanes, settings.lora_slots, settings.max_lora_rank)
        self.catalog = Catalog(self.registry, settings, self.adapters)
        self.resolver = Resolver(self.registry, self.adapters, self._info)  # model name -> what to serve
        self.responses = StoredResponses(settings.responses_store)  # stored responses: engine, variant
        self.usage = Usage(UsageStore(registry.engine))  # per key and model
        self.quotas = Quotas(
            RateStore(registry.engine), self.usage.front, settings.state_poll_seconds, self.usage.write
        )
        self.keys = Keys(
            KeyStore(registry.engine), settings.admin_token, settings.api_keys, settings.state_poll_seconds
        )

    # lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        """Register configured bases, start their engines through the pool, wait until ready."""
        drop_partial_uploads(self.settings.store_dir)
        use_cache(self.settings.artifact_cache())  # stored artifacts: the cache this node's engines use
        for spec in self.settings.bases:
            require_name(spec.name)
            if not (Path(spec.path) / "config.json").is_file():
                raise BadRequestError(f"base {spec.name!r}: {spec.path} is not a checkpoint dir")
            previous = self.registry.state.bases.get(spec.name)
            record = await asyncio.to_thread(describe_base, spec.name, Path(spec.path).resolve(), previous)
            record = record.model_copy(update={"tool_parser": spec.tool_parser})
            self.registry.put_base(record, replace=True)  # the command line wins over a runtime base
        bases = list(self.registry.state.bases.values())
        if not bases:
            raise BadRequestError("no base model configured; pass --base DIR")
        own = [b for b in bases if b.host is None]  # the others are hot-loaded by one of these
        await self.pool.start(own, self._restart_in_place)
        await self._sync()
        for base in bases:
            if base.host is not None and not self.group(base.host):
                log.warning("runtime base %s: its host %s is not configured now", base.name, base.host)
        for spec in self.settings.variants:
            await self.catalog.ensure_variant(spec)
        if not self.pool.supervised:  # engines come and go (Ray replicas): follow them
            self._watcher = asyncio.create_task(self._watch())
        if self.registry.shared:  # other gateways change the registry: follow it
            self._follower = asyncio.create_task(self._follow_registry())
        self._usage_writer = asyncio.create_task(self._write_usage())

    async def _write_usage(self) -> None:
        """Every `state_poll_seconds`, write the usage counted since (also when no request came since)."""
        while True:
            await asyncio.sleep(self.settings.state_poll_seconds)
            try:
                self.usage.write()
            except Exception as exc:  # kept for the next write
                log.warning("could not write usage: %s", exc)

    def _info(self, name: str) -> tuple[set[int], str | None]:
        """What requests need from a base's checkpoint (read once): its stop tokens and chat template."""
        if name not in self._base_info:
            ckpt = Checkpoint(self.registry.base(name).path)
            self._base_info[name] = (set(eos_ids(ckpt.generation_config())), ckpt.chat_template())
        return self._base_info[name]

    async def _follow_registry(self) -> None:
        """Every `state_poll_seconds`, read other gateways' changes: start an engine for a base of
        another architecture registered elsewhere (where this gateway starts engines), stop the one of
        a base deleted elsewhere; deleted variants and deltas are 404s from then on."""
        while True:
            await asyncio.sleep(self.settings.state_poll_seconds)
            try:
                if not self.registry.refresh(force=True):
                    continue
                bases = self.registry.state.bases
                for base in bases.values():
                    if base.host is None and not self.group(base.name) and base.name not in self._starting:
                        if base.name not in self.pool.groups() and self.pool.can_launch():
                            log.info("base %s was registered by another gateway: its engine", base.name)
                            self._start_engine(base)
                for group in [g for g in self.groups() if g not in bases]:
                    log.info("base %s was deleted by another gateway; stopping its engine", group)
                    await self._stop_engine(group)
            except Exception:  # the database away for a while: keep serving what is known, retry
                log.exception("following the registry failed; trying again")

    async def _sync(self) -> None:
        """Give every engine that is up a slot; drop the slots of engines that are gone (a pool whose
        engines restart in place keeps them: the slot blocks admissions while its engine restarts)."""
        async with self._sync_lock:
            up = {e.id: e for e in self.pool.endpoints()}
            for id, endpoint in up.items():
                if id not in self.slots:
                    try:
                        await self._attach(endpoint)
                    except EngineError as exc:
                        log.warning("engine %s at %s: not attached (%s)", id, endpoint.url, exc)
            if self.pool.supervised:
                return
            for id in [i for i in self.slots if i not in up]:
                slot = self.slots.pop(id)
                log.info("engine %s is gone; its requests go to the others of %s", id, slot.group)
                self.adapters.forget(id)
                task = asyncio.create_task(slot.retire())
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)

    async def _watch(self) -> None:
        """Follow the pool's engines: re-attach when it says they changed, and every second."""
        while True:
            try:
                await asyncio.wait_for(self.pool.changed.wait(), 1.0)
            except TimeoutError:
                pass
            self.pool.changed.clear()
            try:
                await self._sync()
            except Exception:
                log.exception("following the engines failed; trying again")

    async def _attach(self, endpoint: Endpoint) -> None:
        base = self.registry.base(endpoint.group)
        client = EngineClient(
            endpoint.url,
            served_name=base.name,
            read_timeout=self.settings.engine_read_timeout or None,
            keep_prefix_cache=self.settings.kv_across_swaps,
        )
        resident = Recipe(base=base.path)
        try:
            current = await client.current_recipe()  # an engine that served before keeps its weights
        except BaseException:
            await client.close()
            raise
        if current is not None:
            resident = Recipe.model_validate_json(current)
        await client.probe_variant_chat()
        on_swap = lambda record: self.metrics.observe_swap(endpoint.id, record)  # noqa: E731
        settings = self.settings
        policy = SwapPolicy(
            settings.swap_quantum,
            settings.swap_max_wait,
            settings.background_max_wait,
            settings.background_gap,
        )
        slot = WeightSlot(client, resident, on_swap=on_swap, policy=policy, id=endpoint.id)
        holding = self.resolver.holding(base.name, resident) if current else None
        slot.last_admitted = holding
        self.slots[endpoint.id] = slot

    async def _restart_in_place(self, id: str, restart: Restart) -> None:
        """The pool's engine `id` died: restart it with its slot's admissions blocked."""
        slot = self.slots[id]
        self.metrics.engine_restarts.labels(id).inc()

        async def run() -> None:
            self.adapters.forget(id)
            await restart()

        await slot.replace_engine(run, Recipe(base=self.registry.base(slot.group).path))

    def group(self, group: str) -> list[WeightSlot]:
        """The slots of every engine started on base `group` (one locally; a replica each on Ray)."""
        return [slot for slot in self.slots.values() if slot.group == group]

    def groups(self) -> list[str]:
        """The engine groups (the bases engines were started on) that have a slot now."""
        return sorted({slot.group for slot in self.slots.values()})

    def endpoint_of(self, slot: WeightSlot) -> Endpoint | None:
        """Where the engine of `slot` runs (None: it is gone)."""
        return next((e for e in self.pool.endpoints() if e.id == slot.id), None)

    def slot(self, id: str) -> WeightSlot | None:
        """The slot of engine `id` (None: gone)."""
        return self.slots.get(id)

    def check_servable(self, group: str) -> None:
        """503 while the engine of a runtime base is starting; 404 if the group has no engine at all."""
        if not self.group(group) and group in self._starting:
            raise UnavailableError(f"the engine for base {group!r} is starting; retry shortly")
        if not self.group(group) and group not in self.pool.groups():
            raise NotFoundError(f"base {group!r} has no running engine")

    async def warm(self, name: str, pin: bool | None = None) -> list[dict]:
        """Have each engine of `name`'s group read its weights' inputs (base tensors, decoded deltas)
        into memory in the background, ahead of its first swap: per engine, {engine, warming, memory};
        `pin`: keep its decoded deltas whatever the cache's budget (False: stop keeping them)."""
        target = self.resolve(name)
        if target.adapter is not None:  # served beside the base as a LoRA adapter: no swap to warm
            return []
        self.check_servable(target.group)
        return [
            {"engine": slot.id, **await slot.client.warm(target.recipe, pin)}
            for slot in self.group(target.group)
        ]

    def any_slot(self, target: Target) -> WeightSlot:
        """A slot of the target's engine group, for calls that need no weights (its tokenizer)."""
        self.check_servable(target.group)
        slots = self.group(target.group)
        if not slots:
            raise UnavailableError(f"no engine for {target.group!r} is up; retry shortly")
        return slots[0]

    def variant_chat(self, group: str) -> bool:
        """Whether the engines of `group` take a variant's chat template and stop tokens on every
        route (deltagate's engines do; an attached stock engine only on chat completions)."""
        slots = self.group(group)
        return not slots or slots[0].client.variant_chat

    def admission(self, target: Target, *, only: str | None = None, background: bool = False) -> Admission:
        """The one way a request gets an engine with its weights (server/admission.py):
        `async with gateway.admission(target) as admitted: ...`; `background` work waits for
        interactive requests' variants (server/policy.py)."""
        return Admission(self, target, only, background)

    async def stop(self) -> None:
        for task in (self._watcher, self._follower, self._usage_writer):
            if task is not None:
                task.cancel()
        for task in self._retiring:
            task.cancel()
        for task in self._starting.values():
            task.cancel()
        for slot in self.slots.values():
            await slot.client.close()
        await self.pool.stop()
        try:
            self.usage.write()
        except Exception as exc:  # the database is gone: what was not written is lost, said so
            log.warning("could not write the last usage counts: %s", exc)

    # resolving ---------------------------------------------------------
    def resolve(
        self, model: str, key: str | None = None, *, continued: str | None = None, caller: Principal = ROOT
    ) -> Target:
        """What serves `model` (server/resolver.py), if `caller` may use it (else 404, as unknown)."""
        return self.resolver.resolve(model, key, continued=continued, caller=caller)

    def slot_of(self, base: str) -> WeightSlot | None:
        """A weight slot of the engine serving base `base` (None: no engine running)."""
        slots = self.group(self.registry.base(base).group)
        return slots[0] if slots else None

    def model_names(self, caller: Principal = ROOT) -> list[str]:
        """Every model name `caller` may use."""
        state = self.registry.state
        return [n for n in self.registry.model_names() if caller.may_use(n, state.base_of(n))]

    def default_model(self) -> str:
        """The model a request that names none means: the base, when there is exactly one."""
        groups = self.groups()
        if len(groups) != 1:
            raise BadRequestError(f"name a 'model': this gateway serves several bases ({', '.join(groups)})")
        return groups[0]

    def engine_states(self) -> list[EngineState]:
        """Per engine: resident variant, every model name it serves, requests in flight (for /metrics)."""
        served: dict[str, list[str]] = {}
        for b in self.registry.state.bases.values():
            served.setdefault(b.group, []).append(b.name)
        for v in self.registry.state.variants.values():
            served.setdefault(self.registry.base(v.base).group, []).append(v.name)
        return [
            EngineState(
                id,
                slot.last_admitted or _base_if_plain(slot, slot.group),
                tuple(served.get(slot.group, ())),
                slot.inflight,
                sum(slot.queued().values()),
            )
            for id, slot in self.slots.items()
        ]

    # bases -------------------------------------------------------------
    async def add_base(self, name: str, path: str, tool_parser: str | None = None) -> BaseRecord:
        """Check a checkpoint and serve it: hot-loaded by a running engine it fits (and whose tool
        parser is the one asked for), else its own."""
        require_name(name)
        self.registry.state.require_free(name)  # a fast answer; the registry's swap checks it again
        if tool_parser is not None:
            try:
                await asyncio.to_thread(check_tool_parser, tool_parser)
            except ValueError as exc:
                raise BadRequestError(f"base {name!r}: {exc}") from None
        resolved = Path(path).expanduser().resolve()
        if not (resolved / "config.json").is_file():
            raise BadRequestError(f"base {name!r}: {path!r} is not a checkpoint directory (no config.json)")
        record = await asyncio.to_thread(describe_base, name, resolved)
        # A tool parser asked for: only an engine running it may host the base (else one of its own).
        hosts = {
            g: self.registry.base(g).path
            for g in self.groups()
            if tool_parser in (None, self.registry.base(g).tool_parser)
        }
        host, reasons = await asyncio.to_thread(place, resolved, hosts)
        if host is None and not self.pool.can_launch():
            why = "; ".join(f"engine {e!r}: {r}" for e, r in reasons.items())
            raise BadRequestError(
                f"base {name!r} fits no running engine ({why}); this gateway is attached to engines it "
                f"did not start, so start a vLLM engine for it and pass --base {name}=DIR "
                f"--engine-url {name}=URL"
            )
        parser = self.registry.base(host).tool_parser if host else tool_parser  # a hosted base: its host's
        record = record.model_copy(update={"host": host, "runtime": True, "tool_parser": parser})
        self.registry.put_base(record)
        if host is None:
            log.info("base %s fits no running engine (%s); starting one", name, reasons)
            self._start_engine(record)
        else:
            log.info("base %s is hot-loaded by the engine of %s", name, host)
        return record

    def _start_engine(self, base: BaseRecord) -> None:
        """Start an engine of its own for a runtime base; requests get 503 until it is ready."""

        async def ready() -> None:
            try:
                await self.pool.launch(base)
                await self._sync()
            except Exception:
                log.exception("the engine for base %s did not start", base.name)
            finally:
                self._starting.pop(base.name, None)

        self._starting[base.name] = asyncio.create_task(ready())

    def base_state(self, name: str) -> str:
        """ready | starting | no engine, for GET /v1/bases."""
        group = self.registry.base(name).group
        if self.group(group):
            return "ready"
        return "starting" if group in self._starting else "no engine"

    def provenance(self, delta: str, base: str) -> Provenance:
        """Whether `delta` was extracted on `base` (exact) or on another base (transferred)."""
        return provenance(self.registry.delta(delta), self.registry.base(base))

    async def delete_base(self, name: str) -> None:
        """Forget a runtime base (409 while variants or other bases use it); stop its own engine."""
        record = self.registry.base(name)
        if not record.runtime:
            raise ConflictError(f"base {name!r} was given on the command line; restart without it")
        hosted = [b.name for b in self.registry.state.bases.values() if b.host == name]
        if hosted:
            raise ConflictError(f"base {name!r}'s engine also serves bases {hosted}; delete them first")
        self.registry.remove_base(name)
        await self._stop_engine(name)

    async def _stop_engine(self, name: str) -> None:
        """Stop the engine of its own a runtime base had (starting or running)."""
        task = self._starting.pop(name, None)
        if task is not None:
            task.cancel()
        for slot in self.group(name):
            await self.slots.pop(slot.id).client.close()
        self._base_info.pop(name, None)
        await self.pool.remove(name)


def _base_if_plain(slot: WeightSlot, base: str) -> str | None:
    """Before any request, an engine holds its plain base (unless attached with other weights)."""
    return base if not slot.resident.deltas and not isinstance(slot.resident, UnknownWeights) else None
