"""Swap orchestration for one engine: admit requests only onto the weights they asked for.

Invariant: a request is admitted only while the engine's resident weights are its
variant's, and a swap starts only when no admitted request is in flight. So no
generation ever continues on new weights, and none is dropped. A pending swap stops
new admissions of the current variant (no starvation): traffic alternating between
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

    def __init__(self, client: EngineClient, resident: Recipe, on_swap: SwapHook | None = None):
        self.client = client
        self.resident = resident
        self.resident_variant: str | None = None
        self.inflight = 0
        self.last_swap: SwapRecord | None = None
        self.recent_swaps: deque[SwapRecord] = deque(maxlen=256)
        self._on_swap = on_swap
        self._notifiers: set[asyncio.Task] = set()
        self._pending: str | None = None
        self._waiting: dict[str, int] = {}
        self._cond = asyncio.Condition()

    async def acquire(self, variant: str, recipe: Recipe) -> None:
        """Wait until `recipe` is resident (swapping if needed), then count one request in."""
        key = recipe.key()
        async with self._cond:
            self._waiting[key] = self._waiting.get(key, 0) + 1
            try:
                while not self._admissible(key):
                    if self._pending is None and not self._waiting.get(self.resident.key()):
                        self._pending = key  # claim the next swap; blocks new admissions
                    if self._pending == key and self.inflight == 0:
                        # Holding the lock is fine: nothing is in flight to release it.
                        try:
                            await self._swap(variant, recipe)
                        finally:
                            self._pending = None
                            self._cond.notify_all()
                        continue
                    await self._cond.wait()
                self.inflight += 1
                self.resident_variant = variant
            finally:
                self._waiting[key] -= 1

    def _admissible(self, key: str) -> bool:
        return self.resident.key() == key and self._pending in (None, key)

    async def replace_engine(self, restart: Callable[[], Awaitable[None]], resident: Recipe) -> None:
        """Run `restart` with admissions and swaps blocked, then record its fresh weights.

        Held for the whole restart so that no request is admitted, and no swap applied,
        against an engine whose weights the slot does not know.
        """
        async with self._cond:
            self.resident = Recipe(base="<restarting>")
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
        if self.inflight == 0 and any(self._waiting.values()):
            task = asyncio.get_running_loop().create_task(self._notify())
            self._notifiers.add(task)
            task.add_done_callback(self._notifiers.discard)

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def _swap(self, variant: str, recipe: Recipe) -> None:
        previous = self.resident
        started_at, start = time.time(), time.perf_counter()
        try:
            result = await self.client.apply(recipe)
        except EngineError as exc:
            self._report(SwapRecord(variant, started_at, start, time.perf_counter() - start, 0, ok=False))
            await self._restore(previous)
            raise SwapError(f"swap to {variant!r} failed, still serving the previous weights: {exc}") from exc
        self.resident = recipe
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
