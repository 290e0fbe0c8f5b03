"""Swap orchestration for one engine: admit requests only onto the weights they asked for.

Invariant: a request is admitted only while the engine's resident weights are its
variant's, and a swap starts only when no admitted request is in flight. So no
generation ever continues on new weights, and none is dropped. When to swap, and to
which waiting variant, is the slot's SwapPolicy (server/policy.py); once a swap is
pending it stops new admissions of the current variant, so traffic alternating between
variants are served in batches, one swap per batch.

While the current variant still serves, the slot asks the engine to stage the variant the policy
will swap to next (its workers merge the changed tensors in the background), so the engine's pause
covers only the commit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Literal

from deltas.recipe import Recipe, RecipeKey
from loaders.engine import ApplyResult, EngineClient, EngineError
from server.errors import EngineGoneError, SwapError
from server.policy import SwapPolicy

log = logging.getLogger("deltagate.swap")


@dataclass
class SwapRecord:
    """One swap attempt: when it started (unix and monotonic clocks), how long the engine was paused
    (`seconds`), whether it worked, and what it rewrote — staged while serving, or merged in the pause."""

    variant: str
    started_at: float
    started_monotonic: float
    seconds: float
    tensors: int
    ok: bool
    of_tensors: int = 0
    bytes: int = 0
    staged: bool = False
    staging_seconds: float = 0.0
    prepared_modules: int = 0
    fallback_modules: int = 0
    prepared_bytes: int = 0
    fallback_reason: str = ""


SwapHook = Callable[[SwapRecord], None]
AdmissionKey = tuple[RecipeKey, str]  # requests with equal keys may share a batch: weights, lane


class UnknownWeights(Recipe):
    """What a slot records while it cannot say what its engine holds: the engine is restarting, or a
    swap failed and the previous weights could not be put back. Its key is no real recipe's, so
    nothing is admitted until a swap (or the restart) sets known weights."""

    base: str = ""
    reason: Literal["restarting", "unknown"]

    def key(self) -> RecipeKey:
        return RecipeKey(f"<{self.reason}>", (), "", False, 0)


class WeightSlot:
    """The resident weights of one engine and the requests running on them."""

    def __init__(
        self,
        client: EngineClient,
        resident: Recipe,
        on_swap: SwapHook | None = None,
        policy: SwapPolicy = SwapPolicy(),
        id: str = "",
    ):
        self.client = client
        self.id = id  # the engine's id in its gateway's pool (server/pool.py; /v1/engines `id`)
        self.resident = resident
        self.lane = ""  # what the admitted requests run as on these weights: "" plain, or "adapters"
        self.policy = policy
        self.resident_since = time.monotonic()
        # The name last admitted (for /v1/engines and metrics); admission compares weights, not names.
        self.last_admitted: str | None = None
        self.inflight = 0
        self.urgent_inflight = 0  # of `inflight`, the interactive requests (the rest: background)
        self.idle_since: float | None = None  # when `inflight` last fell to 0 (None: not since the swap)
        self.last_swap: SwapRecord | None = None
        self.recent_swaps: deque[SwapRecord] = deque(maxlen=256)
        self._on_swap = on_swap
        self._notifiers: set[asyncio.Task] = set()
        self._pending: AdmissionKey | None = None
        self._queued: dict[AdmissionKey, list[float]] = {}  # -> arrival times of waiting requests
        self._urgent: dict[AdmissionKey, int] = {}  # -> how many of them are interactive (server/policy.py)
        self._names: dict[AdmissionKey, str] = {}  # -> the variant name its waiters asked for
        self._recipes: dict[AdmissionKey, Recipe] = {}  # -> its recipe (what to stage)
        self._staging: RecipeKey | None = None  # the weights the engine was last asked to stage
        self._stagers: set[asyncio.Task] = set()
        self.memory: dict = {}  # what the engine's swap machinery holds, from its last swap
        self.retired = False  # its engine left the pool: nothing more is admitted here
        self._cond = asyncio.Condition()

    async def acquire(self, variant: str, recipe: Recipe, lane: str = "", background: bool = False) -> None:
        """Wait until `recipe` is resident (swapping if needed), then count one request in.

        `lane` separates requests on the same weights that must not share a batch: LoRA adapter
        requests ("adapters") and plain ones. Changing lanes on the same weights reloads nothing.
        `background`: the swap policy serves interactive requests' variants first.
        """
        key = _key(recipe, lane)
        async with self._cond:
            self._refuse_if_retired()
            if self._admissible(key):
                self.inflight += 1
                self.urgent_inflight += not background
                self.last_admitted = variant
                return
            arrived = time.monotonic()
            self._names[key] = variant
            self._recipes[key] = recipe
            queue = self._queued.setdefault(key, [])
            queue.append(arrived)
            self._urgent[key] = self._urgent.get(key, 0) + (not background)
            try:
                while not self._admissible(key):
                    self._refuse_if_retired()
                    recheck = None
                    if self._pending is None:
                        self._pending, recheck = self._decide()  # a pending swap blocks new admissions
                    if self._pending == key and self.inflight == 0:
                        # Holding the lock is fine: nothing is in flight to release it.
                        try:
                            await self._swap(variant, recipe, lane)
                        finally:
                            self._pending = None
                            self._cond.notify_all()
                        continue
                    if self.inflight:  # a swap must wait for them: prepare it meanwhile
                        self._stage_next()
                    await self._wait(recheck)
                self._refuse_if_retired()  # it may have left while this request waited
                self.inflight += 1
                self.urgent_inflight += not background
                self.last_admitted = variant
            finally:
                queue.remove(arrived)
                self._urgent[key] -= not background
                if self._pending == key and not queue:  # its last waiter left (client gone): unblock
                    self._pending = None
                    self._cond.notify_all()

    def _refuse_if_retired(self) -> None:
        if self.retired:
            raise EngineGoneError(f"engine {self.id or self.group!r} left the pool")

    async def retire(self) -> None:
        """Admit nothing more (waiting requests get EngineGoneError and go to another engine); close
        the engine's client once the requests it admitted have ended (a dead engine fails them at
        once). Admission and this flag are checked in one step, so no request is admitted onto a
        closed client."""
        self.retired = True
        async with self._cond:
            self._cond.notify_all()
        while self.inflight > 0:
            await asyncio.sleep(0.2)
        await self.client.close()

    def _admissible(self, key: AdmissionKey) -> bool:
        return _key(self.resident, self.lane) == key and self._pending in (None, key)

    def _others(self) -> dict[AdmissionKey, list[float]]:
        resident = _key(self.resident, self.lane)
        return {k: q for k, q in self._queued.items() if k != resident}

    def _decide(self) -> tuple[Hashable | None, float | None]:
        mine = len(self._queued.get(_key(self.resident, self.lane), ()))
        now, others = time.monotonic(), self._others()
        return self.policy.decide(
            now,
            self.resident_since,
            self.inflight,
            mine,
            others,
            self._urgent,
            self.idle_since,
            self.urgent_inflight,
        )

    def _stage_next(self) -> None:
        """Ask the engine to stage the weights the next swap will bring (the pending swap's, else the
        policy's pick among waiting variants), unless they are already staged or resident."""
        upcoming = self._pending or self.policy.next(self._others(), self._urgent, time.monotonic())
        recipe = self._recipes.get(upcoming) if upcoming else None
        if recipe is None or recipe.key() in (self.resident.key(), self._staging):
            return
        self._staging = recipe.key()
        task = asyncio.get_running_loop().create_task(self._stage(self._names[upcoming], recipe))
        self._stagers.add(task)
        task.add_done_callback(self._stagers.discard)

    async def _stage(self, variant: str, recipe: Recipe) -> None:
        try:
            await self.client.stage(recipe)
        except EngineError as exc:  # the swap then merges in its pause
            log.warning("could not stage %s: %s", variant, exc)

    async def _wait(self, timeout: float | None) -> None:
        """Wait for a release or a swap; with a timeout, until the policy's next decision point."""
        if timeout is None:
            await self._cond.wait()
            return
        try:
            await asyncio.wait_for(self._cond.wait(), timeout)
        except TimeoutError:
            pass

    def queued(self) -> dict[str, int]:
        """Requests waiting per variant (the deltagate_queued_requests gauge, vllm:lora_requests_info)."""
        return {self._names[k]: len(q) for k, q in self._queued.items() if q}

    @property
    def group(self) -> str:
        """The base the engine was started on: the model name it serves its answers under."""
        return self.client.served_name

    async def replace_engine(self, restart: Callable[[], Awaitable[None]], resident: Recipe) -> None:
        """Run `restart` with admissions and swaps blocked, then record its fresh weights.

        Held for the whole restart so that no request is admitted, and no swap applied,
        against an engine whose weights the slot does not know.
        """
        async with self._cond:
            self.resident = UnknownWeights(reason="restarting")
            self.lane = ""
            self.last_admitted = None
            self._staging = None  # a stage dies with the engine
            try:
                await restart()
                self.resident = resident
            finally:
                self._cond.notify_all()

    def release(self, background: bool = False) -> None:
        """Count one request out (`background`: as it was counted in).

        Synchronous, so it also runs in the cleanup of a stream whose client went away (an
        await there may be cancelled again). Only the last request out matters to waiters: a
        swap waits for nothing in flight.
        """
        self.inflight -= 1
        self.urgent_inflight -= not background
        if self.inflight == 0:
            self.idle_since = time.monotonic()
        if self.inflight == 0 and any(self._queued.values()):
            task = asyncio.get_running_loop().create_task(self._notify())
            self._notifiers.add(task)
            task.add_done_callback(self._notifiers.discard)

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def _swap(self, variant: str, recipe: Recipe, lane: str = "") -> None:
        if recipe.key() == self.resident.key():  # same weights, other lane: nothing to reload
            self.lane = lane
            self.resident_since, self.idle_since = time.monotonic(), None
            return
        previous = self.resident
        started_at, start = time.time(), time.perf_counter()
        self._staging = None  # the engine takes its stage (if it is this swap's) or drops it
        try:
            result = await self.client.apply(recipe)
        except EngineError as exc:
            self._report(SwapRecord(variant, started_at, start, time.perf_counter() - start, 0, ok=False))
            if await self._restore(previous) is None:
                raise SwapError(f"swap to {variant!r} failed and the engine did not answer: {exc}") from exc
            raise SwapError(f"swap to {variant!r} failed, still serving the previous weights: {exc}") from exc
        self.resident, self.lane = recipe, lane
        self.resident_since, self.idle_since = time.monotonic(), None
        record = SwapRecord(
            variant,
            started_at,
            start,
            time.perf_counter() - start,
            result.tensors,
            ok=True,
            of_tensors=result.of_tensors,
            bytes=result.bytes,
            staged=result.staged,
            staging_seconds=result.staging_seconds,
            prepared_modules=result.prepared_modules,
            fallback_modules=result.fallback_modules,
            prepared_bytes=result.prepared_bytes,
            fallback_reason=result.fallback_reason,
        )
        self.last_swap, self.memory = record, result.memory
        self._report(record)
        staging = f"staged in {record.staging_seconds:.2f}s while serving" if record.staged else "not staged"
        log.info(
            "swapped to %s: engine paused %.3fs (%s; %d of %d tensors, %.1f MB; %d modules prepared, "
            "%d reloaded%s)",
            variant,
            record.seconds,
            staging,
            result.tensors,
            result.of_tensors,
            result.bytes / 1e6,
            result.prepared_modules,
            result.fallback_modules,
            f": {result.fallback_reason}" if result.fallback_reason else "",
        )

    async def _restore(self, previous: Recipe) -> ApplyResult | None:
        """After a failed swap, put the previous weights back (a failed apply may be partial)."""
        try:
            return await self.client.apply(previous)
        except EngineError:
            log.exception("could not restore previous weights; engine state unknown")
            self.resident = UnknownWeights(reason="unknown")
            return None

    def _report(self, record: SwapRecord) -> None:
        self.recent_swaps.append(record)
        if self._on_swap:
            self._on_swap(record)


def _key(recipe: Recipe, lane: str) -> AdmissionKey:
    """The admission key: requests with equal keys may share a batch."""
    return recipe.key(), lane
