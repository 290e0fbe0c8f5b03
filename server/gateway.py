"""The gateway service: the weight slot of every engine, and which engine and weights serve each
request. Engines are started and watched by its pool (server/pool.py); deltas and variants are
catalogued by server/catalog.py."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from deltas import Checkpoint, Recipe
from deltas.store import is_uri, use_cache
from loaders.engine import EngineClient, EngineError, check_tool_parser
from server.adapters import Adapter, AdapterLane
from server.aliases import choose
from server.bases import Provenance, describe_base, place, provenance
from server.catalog import Catalog, drop_partial_uploads, eos_ids, require_name
from server.errors import BadRequestError, ConflictError, GatewayError, NotFoundError, UnavailableError
from server.metrics import EngineState, Metrics
from server.policy import SwapPolicy
from server.pool import Endpoint, EnginePool, LocalPool, Restart
from server.registry import (
    BaseRecord,
    Registry,
    VariantRecord,
    file_identity,
)
from server.settings import GatewaySettings
from server.stored import StoredResponses
from server.swap import UnknownWeights, WeightSlot

log = logging.getLogger("deltagate")


@dataclass(frozen=True)
class Resolved:
    """Where and how to serve one request for a model name."""

    variant: VariantRecord
    recipe: Recipe
    slot: WeightSlot | None  # a slot of its engine, for calls that need no weights (None: none up now)
    chat_template: str | None
    stop_token_ids: list[int]
    adapter: Adapter | None = None  # served as this LoRA adapter on the plain base, not by a swap
    engine: str = ""  # the engine's name: the base it was started on (a runtime base may be hosted)
    alias: str | None = None  # the alias the request named, resolved to `variant`

    @property
    def engine_model(self) -> str:
        """The model name the engine serves this request under (and puts in its answers)."""
        return self.adapter.name if self.adapter else self.engine  # engines serve their base's name


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
        self.slots: dict[str, WeightSlot] = {}  # engine id -> its slot; slot.engine: the base it serves
        self._base_info: dict[str, tuple[set[int], str | None]] = {}  # base -> stop tokens, chat template
        self._starting: dict[str, asyncio.Task] = {}  # runtime bases whose own engine is starting
        self._watcher: asyncio.Task | None = None
        self._follower: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()  # slots of engines gone, closed once their requests end
        self._sync_lock = asyncio.Lock()
        lanes = settings.state_dir / "adapters"
        self.adapters = AdapterLane(lanes, settings.lora_slots, settings.max_lora_rank)
        self.catalog = Catalog(self.registry, settings, self.adapters)
        self.responses = StoredResponses()  # stored Responses-API responses: their engine and variant

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
        own = [b for b in bases if b.engine is None]  # the others are hot-loaded by one of these
        await self.pool.start(own, self._restart_in_place)
        await self._sync()
        for base in bases:
            if base.engine is not None and not self.group(base.engine):
                log.warning("runtime base %s: its engine %s is not configured now", base.name, base.engine)
        for spec in self.settings.variants:
            await self.catalog.ensure_variant(spec)
        if not self.pool.supervised:  # engines come and go (Ray replicas): follow them
            self._watcher = asyncio.create_task(self._watch())
        if self.registry.shared:  # other gateways change the registry: follow it
            self._follower = asyncio.create_task(self._follow_registry())

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
                    if base.engine is None and not self.group(base.name) and base.name not in self._starting:
                        if base.name not in self.pool.engines() and self.pool.can_launch():
                            log.info("base %s was registered by another gateway: its engine", base.name)
                            self._start_engine(base)
                for engine in [e for e in self.engines() if e not in bases]:
                    log.info("base %s was deleted by another gateway; stopping its engine", engine)
                    await self._stop_engine(engine)
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
                log.info("engine %s is gone; its requests go to the others of %s", id, slot.engine)
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
        base = self.registry.base(endpoint.engine)
        client = EngineClient(
            endpoint.url, served_name=base.name, read_timeout=self.settings.engine_read_timeout or None
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
        on_swap = lambda record: self.metrics.observe_swap(base.name, record)  # noqa: E731
        policy = SwapPolicy(self.settings.swap_quantum, self.settings.swap_max_wait)
        slot = WeightSlot(client, resident, on_swap=on_swap, policy=policy, id=endpoint.id)
        slot.last_admitted = self._variant_holding(base.name, resident) if current else None
        self.slots[endpoint.id] = slot

    def _variant_holding(self, engine: str, resident: Recipe) -> str | None:
        """Which registered model an engine found serving (a gateway restarted, its engines not)
        holds: the weights are what counts for admission, the name is for /v1/engines and metrics."""
        for variant in self.registry.state.variants.values():
            if self.engine_of(self.registry.base(variant.base)) == engine and variant.lane != "adapter":
                try:
                    if self.catalog.recipe(variant).key() == resident.key():
                        return variant.name
                except GatewayError:  # a delta gone or changed: not what it holds
                    continue
        return None

    async def _restart_in_place(self, id: str, restart: Restart) -> None:
        """The pool's engine `id` died: restart it with its slot's admissions blocked."""
        slot = self.slots[id]
        self.metrics.engine_restarts.labels(slot.engine).inc()

        async def run() -> None:
            self.adapters.forget(id)
            await restart()

        await slot.replace_engine(run, Recipe(base=self.registry.base(slot.engine).path))

    def group(self, engine: str) -> list[WeightSlot]:
        """The slots of every engine started on base `engine` (one locally; a replica each on Ray)."""
        return [slot for slot in self.slots.values() if slot.engine == engine]

    def engines(self) -> list[str]:
        """The engines (by the base each was started on) that have a slot now."""
        return sorted({slot.engine for slot in self.slots.values()})

    def endpoint_of(self, slot: WeightSlot) -> Endpoint | None:
        """Where the engine of `slot` runs (None: it is gone)."""
        return next((e for e in self.pool.endpoints() if e.id == slot.id), None)

    async def engine_for(self, target: Resolved, deadline: float, only: str | None = None) -> WeightSlot:
        """The engine to admit `target` on: one holding its weights, else an idle one, else the least
        loaded (`only`: that engine, which holds state the request needs); while none is up
        (restarting, or every replica replaced), wait until `deadline`, then 503."""
        while True:
            slots = [s for s in self.group(target.engine) if not self.pool.down(s.id)]
            if only is not None:
                if only not in self.slots:
                    raise NotFoundError(f"engine {only!r}, which holds what this request continues, is gone")
                slots = [s for s in slots if s.id == only]
            if slots:
                return _pick(slots, target.variant.base if target.adapter else target.variant.name)
            self.pool.wake()
            if time.monotonic() >= deadline:
                raise UnavailableError(
                    f"no engine for {target.engine!r} is up (restarting or being replaced); retry shortly "
                    f"(requests wait up to {self.settings.engine_wait:g} s: serve --engine-wait)"
                )
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        for task in (self._watcher, self._follower):
            if task is not None:
                task.cancel()
        for task in self._retiring:
            task.cancel()
        for task in self._starting.values():
            task.cancel()
        for slot in self.slots.values():
            await slot.client.close()
        await self.pool.stop()

    # resolving ---------------------------------------------------------
    def resolve(self, model: str, key: str | None = None, *, target: str | None = None) -> Resolved:
        """The variant, recipe and engine slot serving `model`; an alias picks one of its targets
        (sticky for the client `key`; `target`: that one, if the alias still routes to it)."""
        alias = self.registry.alias_of(model)
        if alias is not None:
            if target is None or target not in alias.split():
                target = choose(alias, key)
            resolved = self.resolve(target)
            return dataclasses.replace(resolved, alias=alias.name)
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
            base_stops, base_template = self._info(base.name)
            template = template or base_template
            stops += sorted(base_stops)
        engine_stops = self._info(engine)[0]  # the engine stops on these by itself
        eos = [e for e in dict.fromkeys(stops) if e not in engine_stops]
        slots = self.group(engine)
        if not slots and engine in self._starting:
            raise UnavailableError(f"the engine for base {base.name!r} is starting; retry shortly")
        if not slots and engine not in self.pool.engines():
            raise NotFoundError(f"base {base.name!r} has no running engine")
        recipe = self.catalog.recipe(variant)
        slot = slots[0] if slots else None
        return Resolved(variant, recipe, slot, template, eos, self._adapter(variant, recipe), engine)

    def engine_of(self, base: BaseRecord) -> str:
        """The engine serving `base`: its own, or the one that hot-loads it."""
        return base.engine or base.name

    def slot_of(self, base: str) -> WeightSlot | None:
        """A weight slot of the engine serving base `base` (None: no engine running)."""
        slots = self.group(self.engine_of(self.registry.base(base)))
        return slots[0] if slots else None

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

    async def admit(self, target: Resolved, slot: WeightSlot) -> None:
        """Count a request in on `slot`'s engine, on its weights: its variant resident, or the plain
        base + its adapter."""
        adapter = target.adapter
        if adapter is None:
            await slot.acquire(target.variant.name, target.recipe)
            return
        await self.adapters.prepare(adapter)
        # Not in one batch with plain requests: on vLLM CPU, plain rows batched with LoRA rows were
        # seen answering differently (a logprob 0.17 off, a greedy token flipped; README).
        await slot.acquire(target.variant.base, Recipe(base=target.recipe.base), lane="adapters")
        try:
            await self.adapters.load(slot.id, slot.client, adapter)
        except BaseException:
            slot.release()
            raise

    def model_names(self) -> list[str]:
        return self.registry.model_names()

    def default_model(self) -> str:
        """The model a request that names none means: the base, when there is exactly one."""
        engines = self.engines()
        if len(engines) != 1:
            raise BadRequestError(f"name a 'model': this gateway serves several bases ({', '.join(engines)})")
        return engines[0]

    def engine_states(self) -> list[EngineState]:
        """Per engine: resident variant, every model name it serves, requests in flight (for /metrics)."""
        served: dict[str, list[str]] = {}
        for b in self.registry.state.bases.values():
            served.setdefault(self.engine_of(b), []).append(b.name)
        for v in self.registry.state.variants.values():
            served.setdefault(self.engine_of(self.registry.base(v.base)), []).append(v.name)
        return [
            EngineState(
                id,
                slot.last_admitted or _base_if_plain(slot, slot.engine),
                tuple(served.get(slot.engine, ())),
                slot.inflight,
                sum(slot.queued().values()),
            )  # fmt: skip
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
        engines = {e: self.registry.base(e).path for e in self.engines()
                   if tool_parser in (None, self.registry.base(e).tool_parser)}  # fmt: skip
        host, reasons = await asyncio.to_thread(place, resolved, engines)
        if host is None and not self.pool.can_launch():
            why = "; ".join(f"engine {e!r}: {r}" for e, r in reasons.items())
            raise BadRequestError(
                f"base {name!r} fits no running engine ({why}); this gateway is attached to engines it "
                f"did not start, so start a vLLM engine for it and pass --base {name}=DIR "
                f"--engine-url {name}=URL"
            )
        parser = self.registry.base(host).tool_parser if host else tool_parser  # a hosted base: its host's
        record = record.model_copy(update={"engine": host, "runtime": True, "tool_parser": parser})
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
        engine = self.engine_of(self.registry.base(name))
        if self.group(engine):
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

    async def delete_variant(self, name: str) -> None:
        """Forget a variant; an adapter it was served as is unloaded and its files deleted."""
        try:
            target = self.resolve(name) if name in self.registry.state.variants else None
        except ConflictError:  # its delta file changed: no adapter of it can have been loaded since
            target = None
        self.registry.remove_variant(name)
        if target is not None and target.adapter is not None:
            for slot in self.group(target.engine):
                try:
                    await self.adapters.unload(slot.id, slot.client, target.adapter)
                except EngineError:
                    log.warning("could not unload %s; the engine forgets it on restart", target.adapter.name)


def _base_if_plain(slot: WeightSlot, base: str) -> str | None:
    """Before any request, an engine holds its plain base (unless attached with other weights)."""
    return base if not slot.resident.deltas and not isinstance(slot.resident, UnknownWeights) else None


def _identity_or_none(path: str) -> tuple[int, int] | None:
    try:
        return file_identity(path)
    except OSError:
        return None


def _pick(slots: list[WeightSlot], name: str) -> WeightSlot:
    """Of several engines of one base, the one a request for `name` goes to: the least loaded of
    those holding it, else an idle one (the longest resident: it swaps), else the least loaded.
    So a variant stays on the engines holding it, and swaps are rare while others are free."""
    def load(slot: WeightSlot) -> int:
        return slot.inflight + sum(slot.queued().values())

    holding = [s for s in slots if s.last_admitted == name]
    if holding:
        return min(holding, key=load)
    idle = [s for s in slots if load(s) == 0]
    if idle:
        return min(idle, key=lambda s: s.resident_since)
    return min(slots, key=load)
