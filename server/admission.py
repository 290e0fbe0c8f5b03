"""One admission path: a request's hold on an engine holding its weights.

    async with gateway.admission(target) as admitted:
        upstream = await admitted.post(path, payload, headers)

On entering, an engine of the target's group is picked (one holding its weights, else an idle one,
else the least loaded), waited for while its engines are down (restarting, or replaced) up to
`--engine-wait`, and the request is counted in on its weights (swapping if needed: server/swap.py;
an adapter loaded: server/adapters.py). An engine that goes away meanwhile — before admission, or
before anything was sent to it — is left for another; that is the only retry. The hold is
released exactly once: on leaving the block, or, for a stream handed on with `detach()`, when the
stream ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import TYPE_CHECKING

import aiohttp

from deltas import Recipe
from loaders.engine import EngineError
from server.errors import EngineGoneError, NotFoundError, SwapError, UnavailableError
from server.swap import WeightSlot

if TYPE_CHECKING:
    from server.gateway import Gateway
    from server.resolver import Target


class Admission:
    """A request admitted on one engine (its `slot`) under its target's weights."""

    def __init__(self, gateway: Gateway, target: Target, only: str | None = None, background: bool = False):
        self.gateway, self.target, self.only = gateway, target, only  # only: that engine (holds state)
        self.background = background  # the swap policy serves interactive requests' variants first
        self.deadline = time.monotonic() + gateway.settings.engine_wait
        self.slot: WeightSlot | None = None
        self._detached = False

    @property
    def engine_id(self) -> str:
        return self.slot.id if self.slot else ""

    async def __aenter__(self) -> Admission:
        await self._admit()
        return self

    async def __aexit__(self, *exc) -> None:
        if not self._detached:
            self.release()

    def detach(self) -> Admission:
        """Hand the hold on to what outlives the block (a stream), which calls `release()` when done."""
        self._detached = True
        return self

    def release(self) -> None:
        """Count the request out of its engine: once, whoever calls it how often."""
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.release(self.background)

    async def post(self, path: str, payload: dict, headers: dict) -> aiohttp.ClientResponse:
        """Send the request to the admitted engine; if that engine is found dead before anything was
        sent, admit on another (restarted, or another replica) and send it there."""
        pool, metrics = self.gateway.pool, self.gateway.metrics
        while True:
            slot = self.slot
            data = json.dumps(salted(payload, slot.resident) if slot.client.keep_prefix_cache else payload)
            try:
                return await slot.client.relay.post(path, data=data, headers=headers)
            except aiohttp.ClientError as exc:
                self.release()
                metrics.upstream_errors.labels(slot.id, "connect").inc()
                if not await pool.died(slot.id):
                    raise EngineError(f"engine for {self.target.group!r} unreachable: {exc}") from exc
                pool.wake()
                await self._admit()

    async def _admit(self) -> None:
        """Pick an engine and count the request in on its weights; an engine that left the pool (or
        died mid-swap) meanwhile is skipped for another."""
        pool = self.gateway.pool
        while True:
            slot = await self._pick()
            try:
                await self._acquire(slot)
                self.slot = slot
                return
            except EngineGoneError:
                pass  # it left the pool (dead, or scaled down) while this request waited on it
            except SwapError:
                if not await pool.died(slot.id):
                    raise
            pool.wake()

    async def _pick(self) -> WeightSlot:
        """The engine to admit on; while none of the group is up, wait until the deadline, then 503."""
        gateway, target = self.gateway, self.target
        while True:
            slots = [s for s in gateway.group(target.group) if not gateway.pool.down(s.id)]
            if self.only is not None:
                if gateway.slot(self.only) is None:
                    raise NotFoundError(
                        f"engine {self.only!r}, which holds what this request continues, is gone"
                    )
                slots = [s for s in slots if s.id == self.only]
            if slots:
                return pick(slots, target.variant.base if target.adapter else target.variant.name)
            gateway.check_servable(target.group)  # a group starting, or with no engine at all
            gateway.pool.wake()
            if time.monotonic() >= self.deadline:
                raise UnavailableError(
                    f"no engine for {target.group!r} is up (restarting or being replaced); retry shortly "
                    f"(requests wait up to {gateway.settings.engine_wait:g} s: serve --engine-wait)"
                )
            await asyncio.sleep(0.2)

    async def _acquire(self, slot: WeightSlot) -> None:
        """Count the request in on `slot`'s engine, on its weights: its variant resident, or the plain
        base + its adapter."""
        target, adapters = self.target, self.gateway.adapters
        if target.adapter is None:
            await slot.acquire(target.variant.name, target.recipe, background=self.background)
            return
        await adapters.prepare(target.adapter)
        # Not in one batch with plain requests: on vLLM CPU, plain rows batched with LoRA rows were
        # seen answering differently (a logprob 0.17 off, a greedy token flipped; README).
        await slot.acquire(target.variant.base, Recipe(base=target.recipe.base), "adapters", self.background)
        try:
            await adapters.load(slot.id, slot.client, target.adapter)
        except BaseException:
            slot.release(self.background)
            raise


def salted(payload: dict, weights: Recipe) -> dict:
    """`payload` with a vLLM cache_salt naming `weights` (joined to the client's own salt): KV cached
    under one set of weights is never reused under another, so swaps need not reset the prefix cache."""
    own = payload.get("cache_salt")
    salt = hashlib.sha256(repr((weights.key(), own)).encode()).hexdigest()[:32]  # vLLM allows 128 chars
    return {**payload, "cache_salt": salt}


def pick(slots: list[WeightSlot], name: str) -> WeightSlot:
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
