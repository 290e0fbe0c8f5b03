"""When one engine swaps away from its resident variant, and to which variant.

An engine holds one variant at a time; a swap costs seconds. Left implicit, a slot swaps as soon
as another variant waits, so two variants interleaved request by request cost a swap per request
or two. The policy makes the trade explicit:

- `quantum_seconds`: once a variant is resident, it keeps admitting its own new requests for at
  least this long while other variants wait, so one swap serves a batch;
- `max_wait_seconds`: a request that has waited this long ends the quantum at once (no starvation);
- the next variant is the one with the most queued requests (ties: the one waiting longest);
- a resident variant with nothing in flight and nothing queued is swapped away from at once.
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

    def decide(
        self,
        now: float,
        resident_since: float,
        inflight: int,
        resident_queued: int,
        queued: dict[K, list[float]],
    ) -> tuple[K | None, float | None]:
        """(variant to swap to now, None) or (None, seconds until the question is worth asking again;
        None: until a request finishes).

        `queued` maps each waiting non-resident variant to its requests' arrival times (oldest
        first); `resident_queued` counts requests for the resident variant not yet admitted (just
        woken by the swap that made it resident): they go first, whatever the quantum.
        """
        waiting = {key: times for key, times in queued.items() if times}
        if not waiting:
            return None, None
        oldest = min(times[0] for times in waiting.values())
        wait_left = oldest + self.max_wait_seconds - now
        if resident_queued and wait_left > 0:
            return None, wait_left
        quantum_left = resident_since + self.quantum_seconds - now
        if inflight == 0 or quantum_left <= 0 or wait_left <= 0:
            return self.next(waiting), None
        return None, min(quantum_left, wait_left)

    @staticmethod
    def next(queued: dict[K, list[float]]) -> K | None:
        """The variant the next swap goes to: the most queued requests (ties: the one waiting longest)."""
        waiting = {key: times for key, times in queued.items() if times}
        if not waiting:
            return None
        return max(waiting, key=lambda k: (len(waiting[k]), -waiting[k][0]))
