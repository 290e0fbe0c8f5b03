"""Swap orchestration for one engine: admit requests only onto the weights they asked for.

Invariant: a request is admitted only while the engine's resident weights are its
variant's, and a swap starts only when no admitted request is in flight. So no
generation ever continues on new weights, and none is dropped. When to swap, and to
which waiting variant, is the slot's SwapPolicy (server/policy.py); once a swap is
pending it stops new admissions of the current variant, so traffic alternating between
variants is served in batches, one swap per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from deltas.recipe import Recipe
from loaders.engine import ApplyResult, EngineClient, EngineError
from server.errors import SwapError
from server.policy import SwapPolicy

log = logging.getLogger("deltagate.swap")

SwapHook = Callable[[str, float, bool], None]  # (variant, seconds, ok)


@dataclass
class SwapRecord:
    """One swap attempt: when it started (unix and monotonic clocks), how long, whether it worked."""

    variant: str
    started_at: float
    started_monotonic: float
    seconds: float
    tensors: int
    ok: bool


class WeightSlot:
    """The resident weights of one engine and the requests running on them."""

    def __init__(
        self,
        client: EngineClient,
        resident: Recipe,
        on_swap: SwapHook | None = None,
        policy: SwapPolicy = SwapPolicy(),
    ):
        self.client = client
        self.resident = resident
        self.lane = ""  # what the admitted requests run as on these weights: "" plain, or "adapters"
        self.policy = policy
        self.resident_since = time.monotonic()
        self.resident_variant: str | None = None
        self.inflight = 0
        self.last_swap: SwapRecord | None = None
        self.recent_swaps: deque[SwapRecord] = deque(maxlen=256)
        self._on_swap = on_swap
        self._notifiers: set[asyncio.Task] = set()
        self._pending: str | None = None
        self._queued: dict[str, list[float]] = {}  # recipe key -> arrival times of waiting requests
        self._names: dict[str, str] = {}  # recipe key -> the variant name its waiters asked for
        self._cond = asyncio.Condition()

    async def acquire(self, variant: str, recipe: Recipe, lane: str = "") -> None:
        """Wait until `recipe` is resident (swapping if needed), then count one request in.

        `lane` separates requests on the same weights that must not share a batch: LoRA adapter
        requests ("adapters") and plain ones. Changing lanes on the same weights reloads nothing.
        """
        key = _key(recipe, lane)
        async with self._cond:
            if self._admissible(key):
                self.inflight += 1
                self.resident_variant = variant
                return
            arrived = time.monotonic()
            self._names[key] = variant
            queue = self._queued.setdefault(key, [])
            queue.append(arrived)
            try:
                while not self._admissible(key):
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
                    await self._wait(recheck)
                self.inflight += 1
                self.resident_variant = variant
            finally:
                queue.remove(arrived)
                if self._pending == key and not queue:  # its last waiter left (client gone): unblock
                    self._pending = None
                    self._cond.notify_all()

    def _admissible(self, key: str) -> bool:
        return _key(self.resident, self.lane) == key and self._pending in (None, key)

    def _decide(self) -> tuple[str | None, float | None]:
        resident = _key(self.resident, self.lane)
        others = {k: q for k, q in self._queued.items() if k != resident}
        mine = len(self._queued.get(resident, ()))
        return self.policy.decide(time.monotonic(), self.resident_since, self.inflight, mine, others)

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

    async def replace_engine(self, restart: Callable[[], Awaitable[None]], resident: Recipe) -> None:
        """Run `restart` with admissions and swaps blocked, then record its fresh weights.

        Held for the whole restart so that no request is admitted, and no swap applied,
        against an engine whose weights the slot does not know.
        """
        async with self._cond:
            self.resident = Recipe(base="<restarting>")
            self.lane = ""
            self.resident_variant = None
            try:
                await restart()
                self.resident = resident
            finally:
                self._cond.notify_all()

    def release(self) -> None:
        """Count one request out.

        Synchronous, so it also runs in the cleanup of a stream whose client went away (an
        await there may be cancelled again). Only the last request out matters to waiters: a
        swap waits for nothing in flight.
        """
        self.inflight -= 1
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
            self.resident_since = time.monotonic()
            return
        previous = self.resident
        started_at, start = time.time(), time.perf_counter()
        try:
            result = await self.client.apply(recipe)
        except EngineError as exc:
            self._report(SwapRecord(variant, started_at, start, time.perf_counter() - start, 0, ok=False))
            if await self._restore(previous) is None:
                raise SwapError(f"swap to {variant!r} failed and the engine did not answer: {exc}") from exc
            raise SwapError(f"swap to {variant!r} failed, still serving the previous weights: {exc}") from exc
        self.resident, self.lane = recipe, lane
        self.resident_since = time.monotonic()
        record = SwapRecord(variant, started_at, start, time.perf_counter() - start, result.tensors, ok=True)
        self.last_swap = record
        self._report(record)
        log.info("swapped to %s in %.2fs (%d tensors)", variant, record.seconds, result.tensors)

    async def _restore(self, previous: Recipe) -> ApplyResult | None:
        """After a failed swap, put the previous weights back (a failed apply may be partial)."""
        try:
            return await self.client.apply(previous)
        except EngineError:
            log.exception("could not restore previous weights; engine state unknown")
            self.resident = Recipe(base="<unknown>")
            return None

    def _report(self, record: SwapRecord) -> None:
        self.recent_swaps.append(record)
        if self._on_swap:
            self._on_swap(record.variant, record.seconds, record.ok)


def _key(recipe: Recipe, lane: str) -> str:
    """The admission key: requests with equal keys may share a batch."""
    return recipe.key() + ("|" + lane if lane else "")
