"""When one engine swaps away from its resident variant, and to which variant.

An engine holds one variant at a time; a swap costs seconds. Left implicit, a slot swaps as soon
as another variant waits, so two variants interleaved request by request cost a swap per request
or two. The policy makes the trade explicit:

- `quantum_seconds`: once a variant is resident, it keeps admitting its own new requests for at
  least this long while other variants wait, so one swap serves a batch;
- `max_wait_seconds`: a request that has waited this long ends the quantum at once (no starvation);
- the next variant is the one with the most queued requests (ties: the one waiting longest);
- a resident variant with nothing in flight and nothing queued is swapped away from at once.

Priorities: requests are interactive (the default) or background (keys of class batch, batches, eval
runs, rebases). A variant with interactive requests waiting goes before one only background work
wants, and a resident serving only background work yields to interactive waiters at once (what it
has in flight ends first). Only interactive waiters end a quantum (at its end, or after
`max_wait_seconds`): a variant only background work wants is swapped to in a gap, once the resident
has had nothing in flight for `background_gap_seconds`, or once its oldest request has waited
`background_max_wait_seconds`, and then it goes next, whatever waits. So background work never takes
the engine from busy interactive traffic before that bound, and still finishes. Measured beside a
rebase (bench/load.py --scenarios priorities, online TTFT p99 about 450 ms alone): background
waiters ending quanta took the engine 14 times in a 27 s run (p99 900 ms); taking any instant with
nothing in flight, as often (861 ms: closed-loop requests of one length end together, emptying the
engine for milliseconds between waves).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TypeVar

from server.settings import GatewaySettings

_DEFAULTS = GatewaySettings.model_fields  # the one declaration of the defaults
K = TypeVar("K", bound=Hashable)  # what identifies a waiting variant (the slot's admission key)


@dataclass(frozen=True)
class SwapPolicy:
    """How long a variant stays resident under contention, and how long any request may wait."""

    quantum_seconds: float = _DEFAULTS["swap_quantum"].default
    max_wait_seconds: float = _DEFAULTS["swap_max_wait"].default
    background_max_wait_seconds: float = _DEFAULTS["background_max_wait"].default
    background_gap_seconds: float = _DEFAULTS["background_gap"].default

    def decide(
        self,
        now: float,
        resident_since: float,
        inflight: int,
        resident_queued: int,
        queued: dict[K, list[float]],
        urgent: dict[K, int] | None = None,
        idle_since: float | None = None,
        urgent_inflight: int | None = None,
    ) -> tuple[K | None, float | None]:
        """(variant to swap to now, None) or (None, seconds until the question is worth asking again;
        None: until a request finishes).

        `queued` maps each waiting non-resident variant to its requests' arrival times (oldest
        first); `resident_queued` counts requests for the resident variant not yet admitted (just
        woken by the swap that made it resident): they go first, whatever the quantum. `urgent`: how
        many of each variant's waiting requests are interactive (None: all of them). `idle_since`:
        when the resident last had nothing in flight (None: it has had, since its swap).
        `urgent_inflight`: how many of the resident's requests in flight are interactive (None: all):
        a resident serving only background work keeps no quantum against interactive waiters.
        """
        waiting = {key: times for key, times in queued.items() if times}
        if not waiting:
            return None, None
        wait_left = min(times[0] + self._max_wait(key, urgent) - now for key, times in waiting.items())
        if resident_queued and wait_left > 0:
            return None, wait_left
        if wait_left <= 0:
            return self.next(waiting, urgent, now), None
        if urgent is not None and not any(urgent.get(key, 0) for key in waiting):
            if inflight:  # only background work waits: a gap, or its bound
                return None, wait_left
            idle_from = resident_since if idle_since is None else idle_since
            gap_left = idle_from + self.background_gap_seconds - now
            if gap_left > 0:
                return None, min(gap_left, wait_left)
            return self.next(waiting, urgent, now), None
        if inflight == 0 or urgent_inflight == 0:
            return self.next(waiting, urgent, now), None
        quantum_left = resident_since + self.quantum_seconds - now
        if quantum_left <= 0:
            return self.next(waiting, urgent, now), None
        return None, min(quantum_left, wait_left)

    def next(
        self, queued: dict[K, list[float]], urgent: dict[K, int] | None = None, now: float = 0.0
    ) -> K | None:
        """The variant the next swap goes to: a background-only one whose request waited past its
        bound, else one with interactive requests waiting, the most queued requests first (ties: the
        one waiting longest)."""
        waiting = {key: times for key, times in queued.items() if times}
        if not waiting:
            return None

        def rank(k: K) -> tuple:
            interactive = urgent is None or urgent.get(k, 0) > 0
            overdue = not interactive and now >= waiting[k][0] + self.background_max_wait_seconds
            return (overdue, interactive, len(waiting[k]), -waiting[k][0])

        return max(waiting, key=rank)

    def _max_wait(self, key: K, urgent: dict[K, int] | None) -> float:
        interactive = urgent is None or urgent.get(key, 0) > 0
        return self.max_wait_seconds if interactive else self.background_max_wait_seconds
