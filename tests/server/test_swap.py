"""The swap slot's invariants, on a fake engine: never swap under a running request."""

import asyncio
import random

import pytest

from deltas import DeltaTerm, Recipe
from loaders.engine import ApplyResult, EngineError
from server.errors import SwapError
from server.swap import WeightSlot

BASE = Recipe(base="/b")
A = Recipe(base="/b", deltas=[DeltaTerm(path="/a")])
B = Recipe(base="/b", deltas=[DeltaTerm(path="/bb", alpha=0.5)])


class FakeEngine:
    """Records applies; checks that nothing runs while weights change."""

    def __init__(self, fail_on: set[str] = frozenset()):
        self.weights = BASE.key()
        self.running = 0
        self.applied: list[str] = []
        self.fail_on = set(fail_on)
        self.staged: list[str] = []
        self.closed = False

    async def close(self) -> None:
        self.closed = True

    async def stage(self, recipe: Recipe) -> bool:
        self.staged.append(recipe.key())
        return True

    async def apply(self, recipe: Recipe) -> ApplyResult:
        assert self.running == 0, "swap started while a request was running"
        self.weights = "<changing>"
        await asyncio.sleep(0.002)
        if recipe.key() in self.fail_on:
            self.weights = "<partial>"
            raise EngineError("boom")
        self.weights = recipe.key()
        self.applied.append(recipe.key())
        return ApplyResult(tensors=3, seconds=0.002, repaired=[])


async def _request(slot: WeightSlot, engine: FakeEngine, name: str, recipe: Recipe) -> str:
    await slot.acquire(name, recipe)
    try:
        engine.running += 1
        assert engine.weights == recipe.key(), "admitted onto the wrong weights"
        await asyncio.sleep(random.random() * 0.005)
        assert engine.weights == recipe.key(), "weights changed under a running request"
        return name
    finally:
        engine.running -= 1
        slot.release()


async def test_alternating_traffic_is_served_on_the_right_weights():
    random.seed(0)
    engine = FakeEngine()
    slot = WeightSlot(engine, BASE)
    jobs = [("a", A), ("b", B), ("base", BASE)] * 40
    random.shuffle(jobs)
    done = await asyncio.wait_for(
        asyncio.gather(*(_request(slot, engine, n, r) for n, r in jobs)), timeout=30
    )
    assert sorted(done) == sorted(n for n, _ in jobs)
    assert slot.inflight == 0
    # requests for the same variant are batched: far fewer swaps than requests
    assert len(engine.applied) < len(jobs) / 2


async def test_no_swap_when_already_resident():
    engine = FakeEngine()
    slot = WeightSlot(engine, BASE)
    await asyncio.gather(*(_request(slot, engine, "base", BASE) for _ in range(10)))
    assert engine.applied == []


async def test_failed_swap_restores_previous_weights_and_reports():
    engine = FakeEngine(fail_on={B.key()})
    seen = []
    slot = WeightSlot(engine, BASE, on_swap=lambda r: seen.append((r.variant, r.ok)))
    await _request(slot, engine, "a", A)
    with pytest.raises(SwapError, match="still serving the previous weights"):
        await _request(slot, engine, "b", B)
    assert engine.weights == A.key()  # restored after the partial apply
    assert slot.resident.key() == A.key()
    assert await _request(slot, engine, "a", A) == "a"
    assert ("b", False) in seen and ("a", True) in seen


async def test_the_next_variant_is_staged_while_the_current_one_serves_and_restaged_if_the_pick_changes():
    from server.policy import SwapPolicy

    engine = FakeEngine()
    slot = WeightSlot(engine, BASE, policy=SwapPolicy(quantum_seconds=0.3, max_wait_seconds=10))
    await slot.acquire("base", BASE)  # a request in flight on the base
    waiting_a = asyncio.create_task(_request(slot, engine, "a", A))
    await asyncio.sleep(0.05)
    assert engine.staged == [A.key()]  # the policy's pick while the base still serves
    waiting_b = [asyncio.create_task(_request(slot, engine, "b", B)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert engine.staged == [A.key(), B.key()]  # two waiters for b: b goes next, a's stage is dropped
    assert engine.applied == []
    slot.release()
    await asyncio.wait_for(asyncio.gather(waiting_a, *waiting_b), timeout=10)
    assert engine.applied[0] == B.key()  # the staged one
    assert slot.inflight == 0


async def test_a_retired_slot_admits_nothing_and_closes_its_client_after_the_last_request():
    """An engine left the pool (a dead Ray replica): the requests waiting on its slot and any that
    still picked it get EngineGoneError (the proxy sends them to another engine), never a closed
    client; the one in flight ends first."""
    from server.errors import EngineGoneError

    engine = FakeEngine()
    slot = WeightSlot(engine, BASE, id="tied@x")
    await slot.acquire("base", BASE)  # in flight
    waiting = asyncio.create_task(slot.acquire("a", A))  # waits for the base's request to end
    await asyncio.sleep(0.05)
    retiring = asyncio.create_task(slot.retire())
    with pytest.raises(EngineGoneError, match="tied@x"):
        await asyncio.wait_for(waiting, timeout=5)
    with pytest.raises(EngineGoneError):
        await slot.acquire("base", BASE)  # even its resident weights
    await asyncio.sleep(0.3)
    assert not engine.closed and not retiring.done()  # the request in flight still runs
    slot.release()
    await asyncio.wait_for(retiring, timeout=5)
    assert engine.closed and slot.inflight == 0 and engine.applied == []


def test_unknown_weights_admit_nothing():
    from server.swap import UnknownWeights

    restarting = UnknownWeights(reason="restarting")
    assert restarting.key() != Recipe(base="").key()
    assert restarting.key() != UnknownWeights(reason="unknown").key()
