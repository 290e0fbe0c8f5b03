"""Which engine and variant made each stored Responses-API response.

With `serve --responses-store`, engines keep the responses they make (vLLM's
VLLM_ENABLE_RESPONSES_API_STORE, in that engine's memory). A response id then belongs to one
engine and one variant: retrieving it, cancelling it, or continuing it (`previous_response_id`)
goes to that engine, and a continuation is served only on the variant that made it, never on
other weights. This process remembers the latest `limit` ids (not across its restarts).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass

from server.errors import NotFoundError

RESPONSE_ID = re.compile(rb'"id":"(resp_[A-Za-z0-9_-]+)"')  # the first one in an answer is the response's


@dataclass(frozen=True)
class Stored:
    engine_id: str  # the engine (slot) id
    variant: str
    answers_as: str  # the model name the engine put in it


class StoredResponses:
    """Which engine and variant made each stored response (`enabled`: engines store them, serve
    --responses-store)."""

    def __init__(self, enabled: bool = False, limit: int = 100_000):
        self.enabled, self.limit = enabled, limit
        self._where: OrderedDict[str, Stored] = OrderedDict()

    def add(self, raw: bytes, stored: Stored) -> bool:
        """Remember the response whose id is the first in `raw` (False: none in it yet)."""
        match = RESPONSE_ID.search(raw)
        if match is None:
            return False
        self._where[match[1].decode()] = stored
        while len(self._where) > self.limit:
            self._where.popitem(last=False)
        return True

    def get(self, response_id: str) -> Stored:
        stored = self._where.get(response_id)
        if stored is None:
            raise NotFoundError(
                f"response {response_id!r} was not made through this gateway since it started "
                "(or is older than the latest it remembers)"
            )
        return stored

    def variant_of(self, response_id: str) -> str | None:
        """The variant that made `response_id` (None: unknown here)."""
        stored = self._where.get(response_id)
        return stored.variant if stored else None
