"""The swap policy: a quantum of residency under contention, a bound on waiting, the next variant by
queued work — as a pure decision, and on a weight slot over a fake engine."""

import asyncio
import time

from deltas import DeltaTerm, Recipe
from server.policy import SwapPolicy
from server.swap import WeightSlot
from tests.server.test_swap import BASE, A, B, FakeEngine, _request

C = Recipe(base="/b", deltas=[DeltaTerm(path="/c")])


def test_decide_holds_the_quantum_then_picks_the_most_queued():
    policy = SwapPolicy(quantum_seconds=2.0, max_wait_seconds=10.0)
    queued = {"a": [100.5], "b": [100.2, 100.6, 100.7]}
    assert policy.decide(101.0, 100.0, inflight=3, resident_queued=0, queued=queued) == (None, 1.0)
    assert policy.decide(102.0, 100.0, inflight=3, resident_queued=0, queued=queued) == ("b", None)
    # nothing running on the resident variant: no reason to keep it
    assert policy.decide(100.1, 100.0, inflight=0, resident_queued=0, queued=queued) == ("b", None)
    # the resident's own woken requests go first
    assert policy.decide(103.0, 100.0, inflight=0, resident_queued=2, queued=queued)[0] is None
    assert policy.decide(103.0, 100.0, inflight=3, resident_queued=0, queued={}) == (None, None)


def test_decide_ends_the_quantum_when_a_request_waited_too_long():
    policy = SwapPolicy(quantum_seconds=60.0, max_wait_seconds=5.0)
    queued = {"a": [100.0], "b": [103.0, 103.1]}
    assert policy.decide(104.0, 99.0, inflight=8, resident_queued=0, queued=queued) == (None, 1.0)
    # a's request has waited 5 s: the quantum ends; b has more queued, so b goes first (a next)
    assert policy.decide(105.0, 99.0, inflight=8, resident_queued=4, queued=queued) == ("b", None)


def test_ties_go_to_the_variant_waiting_longest():
    policy = SwapPolicy()
    assert policy.decide(10.0, 0.0, 1, 0, {"a": [5.0], "b": [4.0]}) == ("b", None)


def test_interactive_requests_go_first_and_background_work_still_finishes():
    """Priorities: a variant only background work wants waits while the resident has requests in
    flight, past any quantum, until a gap or until its requests waited background_max_wait; then it
    goes next."""
    policy = SwapPolicy(quantum_seconds=2.0, max_wait_seconds=5.0, background_max_wait_seconds=20.0)
    queued = {"batch": [100.0, 100.1, 100.2], "user": [101.0]}
    urgent = {"batch": 0, "user": 1}
    # the quantum over: the interactive variant goes first, though the batch has more queued
    assert policy.decide(103.0, 100.0, 1, 0, queued, urgent) == ("user", None)
    # only background work waits: while the resident has requests in flight it ends no quantum, at
    # its end or at max_wait; it is asked again when its bound comes (or a request finishes)...
    only = {"batch": queued["batch"]}
    assert policy.decide(101.0, 100.5, 1, 0, only, {"batch": 0}) == (None, 19.0)
    assert policy.decide(110.0, 100.5, 4, 0, only, {"batch": 0}) == (None, 10.0)
    # ... but it is served in a gap: once the resident has had nothing in flight for background_gap
    # (closed-loop requests of one length end together: nothing is in flight for milliseconds)
    assert policy.decide(110.0, 109.0, 0, 0, only, {"batch": 0}, idle_since=109.5) == (None, 0.5)
    assert policy.decide(110.0, 100.5, 0, 0, only, {"batch": 0}, idle_since=109.0) == ("batch", None)
    assert policy.decide(110.0, 109.0, 0, 0, only, {"batch": 0}) == ("batch", None)  # idle since its swap
    # waited past background_max_wait: its variant goes next, whatever waits
    assert policy.decide(120.0, 119.5, 4, 0, queued, urgent) == ("batch", None)
    # a resident serving only background work keeps no quantum against an interactive waiter
    assert policy.decide(103.0, 102.5, 2, 0, queued, urgent, urgent_inflight=0) == ("user", None)
    assert policy.decide(103.0, 102.5, 2, 0, queued, urgent, urgent_inflight=1) == (None, 1.5)
    # without priorities (urgent None): as before, the most queued
    assert policy.decide(103.0, 100.0, 1, 0, queued) == ("batch", None)


async def test_a_slot_serves_interactive_waiters_before_background_ones():
    """On a weight slot over a fake engine: with A resident and busy, a background request for B and
    then an interactive one for C wait; C is swapped to first, B after."""
    engine = FakeEngine()
    slot = WeightSlot(engine, BASE, policy=SwapPolicy(quantum_seconds=0.2, max_wait_seconds=10.0))
    order = []

    async def ask(name, recipe, background, delay):
        await asyncio.sleep(delay)
        await slot.acquire(name, recipe, background=background)
        order.append(name)
        await asyncio.sleep(0.05)
        slot.release()

    await slot.acquire("a", A)  # resident and in flight for the quantum
    waiting = [
        asyncio.create_task(ask("b", B, True, 0.0)),
        asyncio.create_task(ask("c", C, False, 0.05)),
    ]
    await asyncio.sleep(0.3)
    slot.release()
    await asyncio.wait_for(asyncio.gather(*waiting), 10)
    assert order == ["c", "b"]


async def _steady(slot, engine, name, recipe, until: float, log: list) -> None:
    """A closed-loop client: one request after another on `recipe` until `until`."""
    while time.monotonic() < until:
        await _request(slot, engine, name, recipe)
        log.append((time.monotonic(), name))


async def test_quantum_keeps_a_busy_variant_resident_and_max_wait_bounds_the_others():
    """Two closed-loop clients on A keep it busy; B's requests wait at most about max_wait."""
    engine = FakeEngine()
    slot = WeightSlot(engine, A, policy=SwapPolicy(quantum_seconds=10.0, max_wait_seconds=0.3))
    engine.weights = A.key()
    until = time.monotonic() + 1.5
    log: list = []
    waits = []

    async def b_client() -> None:
        while time.monotonic() < until:
            start = time.monotonic()
            await _request(slot, engine, "b", B)
            waits.append(time.monotonic() - start)
            await asyncio.sleep(0.05)

    await asyncio.gather(
        _steady(slot, engine, "a", A, until, log), _steady(slot, engine, "a", A, until, log), b_client()
    )
    assert waits and max(waits) < 0.3 + 0.1, waits  # bounded by max_wait (+ a swap and a request)
    assert any(n == "a" for _, n in log)


async def test_a_quantum_batches_interleaved_traffic_into_fewer_swaps():
    """Closed-loop clients of A and B: with a quantum the engine swaps a few times, not per request."""

    async def swaps_with(quantum: float) -> int:
        engine = FakeEngine()
        slot = WeightSlot(engine, BASE, policy=SwapPolicy(quantum_seconds=quantum, max_wait_seconds=5.0))
        until = time.monotonic() + 1.0
        log: list = []
        clients = [_steady(slot, engine, n, r, until, log) for n, r in (("a", A), ("b", B)) * 2]
        await asyncio.gather(*clients)
        assert {n for _, n in log} == {"a", "b"}
        return len(engine.applied)

    eager, batched = await swaps_with(0.0), await swaps_with(0.25)
    assert batched <= 1.0 / 0.25 + 2 < eager, (batched, eager)


async def test_a_waiter_that_leaves_does_not_block_the_slot():
    """The last request for a pending variant is cancelled (its client left): others go on."""
    engine = FakeEngine()
    slot = WeightSlot(engine, A)
    engine.weights = A.key()
    await slot.acquire("a", A)  # A busy: B's request must wait
    waiter = asyncio.create_task(slot.acquire("b", B))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    await asyncio.wait_for(slot.acquire("a", A), timeout=1)  # A admitted again: nothing pending
    slot.release()
    slot.release()
    assert engine.applied == [] and slot.inflight == 0


def test_priority_scheduling_starts_engines_with_vllms_priority_policy(tmp_path):
    from server.settings import GatewaySettings

    plain = GatewaySettings(state_dir=tmp_path)
    assert "--scheduling-policy" not in plain.engine_flags()
    flags = GatewaySettings(state_dir=tmp_path, priority_scheduling=True).engine_flags()
    assert flags[flags.index("--scheduling-policy") + 1] == "priority"
    own = GatewaySettings(
        state_dir=tmp_path, priority_scheduling=True, engine_args=["--scheduling-policy", "fcfs"]
    )
    assert own.engine_flags().count("--scheduling-policy") == 1  # the operator's own choice stands
