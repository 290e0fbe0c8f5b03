"""Limits per key and per project: requests and tokens per minute, concurrent requests, tokens per
day and per month. A request counts in its key's window and in its project's (each where limited) and
is admitted only while both are under their limits.

Per minute: a sliding window of the last 60 s of admitted requests (and the tokens each used, known
when it ends: the engine's usage), so a closed loop far over the limit gets exactly `rpm` requests
in any 60 s on one gateway. A request is admitted while the window is under the limit; tokens are
counted when they are known, so a tokens-per-minute limit is overshot by at most the requests in
flight when it is reached. Budgets (per UTC day and month) are the usage table's sums (every
gateway's, server/usage.py) plus what this gateway counted since it read them.

Several gateways sharing a state database share each window: every `poll` seconds a gateway writes
its own window's totals per key (one row per gateway and key) and reads the others'; a request is
admitted while its own window plus the others' last totals are under the limit. What one gateway
cannot see is what the others admitted since their last write, so the shared limit holds within
about one poll of admissions per gateway (docs: "Quotas and rate limits"); the alternative, a
database write per request, would put the database on the hot path of every inference call.

Every answer to a limited key carries OpenAI's `x-ratelimit-limit-*`, `x-ratelimit-remaining-*`
and `x-ratelimit-reset-*` headers (requests, tokens); a refused one is a 429 with `Retry-After`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from server.errors import RateLimitError
from server.statedb import Store, metadata

log = logging.getLogger("deltagate")
WINDOW = 60.0

rate_windows = sa.Table(
    "rate_windows",
    metadata,
    sa.Column("front", sa.String(32), primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),  # the window: a key (PROJECT/NAME) or a PROJECT
    sa.Column("requests", sa.Integer, nullable=False),
    sa.Column("tokens", sa.BigInteger, nullable=False),
    sa.Column("written_at", sa.Float, nullable=False),
)


class Limits(BaseModel):
    """A key's or a project's limits (none: unlimited)."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=1, description="Requests per minute")
    tpm: int | None = Field(None, ge=1, description="Tokens (prompt + completion) per minute")
    concurrent: int | None = Field(None, ge=1, description="Requests in flight at once")
    tokens_per_day: int | None = Field(None, ge=1, description="Tokens per UTC day")
    tokens_per_month: int | None = Field(None, ge=1, description="Tokens per UTC month")

    def any(self) -> bool:
        """Whether any limit is set (on every request of a key: plain attribute reads)."""
        return (
            self.rpm is not None
            or self.tpm is not None
            or self.concurrent is not None
            or self.tokens_per_day is not None
            or self.tokens_per_month is not None
        )


NO_LIMITS = Limits()


class RateStore(Store):
    """Each gateway's last window totals per key, and the usage sums budgets are checked against."""

    def exchange(
        self, front: str, mine: dict[str, tuple[int, int]], stale: float
    ) -> dict[str, tuple[int, int]]:
        """Write this gateway's window totals (key -> (requests, tokens)); the other gateways' totals
        written within `stale` seconds, summed per key."""
        now = time.time()

        def work(conn):
            conn.execute(rate_windows.delete().where(rate_windows.c.front == front))
            rows = [
                {"front": front, "key": k, "requests": r, "tokens": t, "written_at": now}
                for k, (r, t) in mine.items()
            ]
            if rows:
                conn.execute(rate_windows.insert(), rows)
            c = rate_windows.c
            query = (
                sa.select(c.key, sa.func.sum(c.requests), sa.func.sum(c.tokens))
                .where(c.front != front, c.written_at > now - stale)
                .group_by(c.key)
            )
            return {k: (int(r), int(t)) for k, r, t in conn.execute(query)}

        return self._run(work)

    def budget_used(self, names: list[str]) -> dict[str, tuple[int, int]]:
        """Tokens each window (a key PROJECT/NAME, or a PROJECT) used this UTC day and this UTC month,
        summed over every gateway."""
        from server.usage import usage_table

        now = datetime.now(UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
        c = usage_table.c
        tokens = c.prompt_tokens + c.completion_tokens
        day_and_month = (sa.func.sum(sa.case((c.hour >= day, tokens), else_=0)), sa.func.sum(tokens))
        queries = [
            sa.select(column, *day_and_month).where(column.in_(chosen), c.hour >= month).group_by(column)
            for column, chosen in (
                (c.key, [n for n in names if "/" in n]),
                (c.project, [n for n in names if "/" not in n]),
            )
            if chosen
        ]

        def work(conn):
            return {k: (int(d or 0), int(m or 0)) for q in queries for k, d, m in conn.execute(q)}

        return self._run(work) if queries else {}


@dataclass
class _Window:
    entries: deque = field(default_factory=deque)  # [admitted at (monotonic), tokens] of the last WINDOW s
    token_sum: int = 0  # the entries' tokens (kept as they change: a window may hold thousands)
    inflight: int = 0
    remote: tuple[int, int] = (0, 0)  # the other gateways' (requests, tokens), as last read
    budget: tuple[int, int] = (0, 0)  # (day, month) tokens as last read from the usage table
    since_read: int = 0  # tokens this gateway counted since then

    def trim(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW:
            self.token_sum -= self.entries.popleft()[1]

    def requests(self) -> int:
        return len(self.entries) + self.remote[0]

    def tokens(self) -> int:
        return self.token_sum + self.remote[1]


class Grant:
    """One admitted request's place in its windows (its key's, its project's): `done(usage)` once, when
    it ends; `headers`: the x-ratelimit-* headers of its answer (counting it)."""

    def __init__(self, places: list[tuple[_Window, list]], headers: dict[str, str] | None = None):
        self.places, self.headers = places, headers or {}

    def done(self, usage: dict | None) -> None:
        places, self.places = self.places, []
        tokens = int((usage or {}).get("prompt_tokens") or 0) + int(
            (usage or {}).get("completion_tokens") or 0
        )
        for window, entry in places:
            if entry[0] > time.monotonic() - WINDOW:  # still in the window (else trimmed with 0 tokens)
                entry[1] = tokens
                window.token_sum += tokens
            window.inflight -= 1
            window.since_read += tokens


UNLIMITED = Grant([])


class Quotas:
    """Every limited key's window on this gateway, shared with the others every `poll` seconds."""

    def __init__(self, store: RateStore, front: str, poll: float, write_usage=lambda: None):
        self.store, self.front, self.poll, self.write_usage = store, front, poll, write_usage
        self._windows: dict[str, _Window] = {}
        self._limits: dict[str, Limits] = {}
        self._exchanged = float("-inf")
        self._lock = threading.Lock()

    def admit(self, quotas: list[tuple[str, Limits]]) -> Grant:
        """A place for one request in each of its windows (name, limits: Principal.quotas), or a 429
        saying which limit of which and when to retry. The headers are the first window's (the key's
        where it is limited)."""
        if not quotas:
            return UNLIMITED
        for name, limits in quotas:
            self._limits[name] = limits
            self._windows.setdefault(name, _Window())
        self._exchange()
        now = time.monotonic()
        for name, limits in quotas:
            window = self._windows[name]
            window.trim(now)
            refusal = self._refusal(window, limits, now)
            if refusal is not None:
                message, retry = refusal
                headers = self._headers(window, limits, now) | {"Retry-After": str(max(1, math.ceil(retry)))}
                what = "key" if "/" in name else "project"
                raise RateLimitError(f"{what} {name!r}: {message}; retry in {retry:.0f} s", headers)
        places = []
        for name, _ in quotas:
            entry = [now, 0]
            self._windows[name].entries.append(entry)
            self._windows[name].inflight += 1
            places.append((self._windows[name], entry))
        first, limits = self._windows[quotas[0][0]], quotas[0][1]
        return Grant(places, self._headers(first, limits, now))

    @staticmethod
    def _headers(window: _Window, limits: Limits, now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers of the window (trimmed at `now`), for its per-minute limits."""
        reset = f"{max(0.0, window.entries[0][0] + WINDOW - now):.3f}s" if window.entries else "0s"
        out = {}
        for kind, limit, used in (
            ("requests", limits.rpm, window.requests()),
            ("tokens", limits.tpm, window.tokens()),
        ):
            if limit is not None:
                out[f"x-ratelimit-limit-{kind}"] = str(limit)
                out[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used))
                out[f"x-ratelimit-reset-{kind}"] = reset
        return out

    def _refusal(self, window: _Window, limits: Limits, now: float) -> tuple[str, float] | None:
        oldest = window.entries[0][0] + WINDOW - now if window.entries else 1.0
        if limits.concurrent is not None and window.inflight >= limits.concurrent:
            return f"{window.inflight} requests in flight, its limit is {limits.concurrent}", 1.0
        if limits.rpm is not None and window.requests() >= limits.rpm:
            return f"over its {limits.rpm} requests per minute", oldest
        if limits.tpm is not None and window.tokens() >= limits.tpm:
            return f"over its {limits.tpm} tokens per minute", oldest
        day, month = (used + window.since_read for used in window.budget)
        utc = datetime.now(UTC)
        if limits.tokens_per_day is not None and day >= limits.tokens_per_day:
            left = 86400 - (utc.hour * 3600 + utc.minute * 60 + utc.second)
            return f"its {limits.tokens_per_day} tokens for today (UTC) are used", left
        if limits.tokens_per_month is not None and month >= limits.tokens_per_month:
            return f"its {limits.tokens_per_month} tokens for this month (UTC) are used", 86400.0
        return None

    def _exchange(self) -> None:
        """Every `poll` seconds: write this gateway's windows, read the others' and the budgets' sums."""
        if time.monotonic() - self._exchanged < self.poll:
            return
        with self._lock:
            if time.monotonic() - self._exchanged < self.poll:
                return
            self._exchanged = time.monotonic()
            now = time.monotonic()
            mine = {}
            for key, window in self._windows.items():
                window.trim(now)
                mine[key] = (len(window.entries), window.token_sum)
            try:
                self.write_usage()
                remote = self.store.exchange(self.front, mine, stale=max(3 * self.poll, 5.0))
                budgets = self.store.budget_used([k for k, lim in self._limits.items() if _budgeted(lim)])
            except Exception as exc:  # limits hold on this gateway's own counts until the database is back
                log.warning("could not share rate-limit windows: %s", exc)
                return
            for key, window in self._windows.items():
                window.remote = remote.get(key, (0, 0))
                if key in budgets or _budgeted(self._limits.get(key)):
                    window.budget, window.since_read = budgets.get(key, (0, 0)), 0


def _budgeted(limits: Limits | None) -> bool:
    return limits is not None and (limits.tokens_per_day is not None or limits.tokens_per_month is not None)
