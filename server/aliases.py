"""Aliases: a stable public model name → one variant, or a weighted split over several (a canary).

An alias is a record in the registry (server/registry.py), so it is persisted, changed atomically
(one compare-and-swap of the registry document) and seen by every gateway on a shared state
database within `state_poll_seconds`. A request resolves the alias once, on arrival, to one target
variant; from then on it is that variant's request (admission, swap, metrics), so a switch never
touches a request already admitted.

Which target a request gets: with a client key (the `X-Deltagate-Session` header, else the body's
`user`, else Anthropic's `metadata.user_id`), weighted rendezvous hashing of (alias, key, target) —
the same key always lands on the same target while the targets are unchanged, and raising a canary's
weight only moves keys onto the canary, never between the others. Without a key, a weighted draw.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections.abc import Mapping

from pydantic import BaseModel, Field, field_validator

SESSION_HEADER = "x-deltagate-session"  # a client's sticky key
VARIANT_HEADER = "X-Deltagate-Variant"  # which variant served an answer (the body's model stays the alias)


class AliasTarget(BaseModel):
    variant: str = Field(description="a variant or base name (not another alias)")
    weight: float = Field(1.0, gt=0, le=1e6, description="share of requests, relative to the other targets")


def distinct(targets: list[AliasTarget]) -> list[AliasTarget]:
    """ValueError (a 422) unless each target is named once."""
    names = [t.variant for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"an alias names each target once (got {names})")
    return targets


class AliasRecord(BaseModel):
    """An alias as stored: its targets now, and the ones before the last change (for rollback)."""

    name: str
    targets: list[AliasTarget] = Field(min_length=1, max_length=16)
    previous: list[AliasTarget] | None = None
    updated_at: float = Field(default_factory=time.time)
    generation: int = Field(1, description="bumped at every change")

    _distinct = field_validator("targets")(distinct)

    def split(self) -> dict[str, float]:
        """Each target's fraction of requests."""
        total = sum(t.weight for t in self.targets)
        return {t.variant: t.weight / total for t in self.targets}


def choose(alias: AliasRecord, key: str | None, rng: random.Random | None = None) -> str:
    """The target variant serving one request for `alias` (sticky for a given `key`)."""
    targets = alias.targets
    if len(targets) == 1:
        return targets[0].variant
    if key is None:
        return (rng or random).choices([t.variant for t in targets], [t.weight for t in targets])[0]

    def score(target: AliasTarget) -> float:  # -ln(u)/w: the lowest wins, with probability ∝ w
        digest = hashlib.sha256(f"{alias.name}\0{key}\0{target.variant}".encode()).digest()
        u = (int.from_bytes(digest[:8], "big") + 1) / (2**64 + 1)  # in (0, 1)
        return -math.log(u) / target.weight

    return min(targets, key=score).variant


def sticky_key(headers: Mapping[str, str], extra: Mapping[str, object]) -> str | None:
    """The client's key for sticky routing: the session header, OpenAI's `user`, Anthropic's
    `metadata.user_id` (None: no key, a weighted draw)."""
    if key := headers.get(SESSION_HEADER):
        return key
    user = extra.get("user")
    if isinstance(user, str) and user:
        return user
    metadata = extra.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        return metadata["user_id"]
    return None
