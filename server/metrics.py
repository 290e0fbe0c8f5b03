"""Prometheus metrics of the gateway, in a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    """Counters and histograms the gateway updates; `render` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "deltagate_requests_total", "Inference requests by model, endpoint and status",
            ["model", "endpoint", "status"], registry=self.registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "deltagate_request_seconds", "Inference request latency including any swap wait",
            ["endpoint"], registry=self.registry,
        )  # fmt: skip
        self.swaps = Counter(
            "deltagate_swaps_total", "Weight swaps by target variant and result",
            ["variant", "result"], registry=self.registry,
        )  # fmt: skip
        self.swap_seconds = Histogram(
            "deltagate_swap_seconds", "Duration of successful weight swaps",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=self.registry,
        )  # fmt: skip
        self.inflight = Gauge(
            "deltagate_inflight_requests", "Requests admitted and not finished",
            registry=self.registry,
        )  # fmt: skip

        self.engine_restarts = Counter(
            "deltagate_engine_restarts_total", "Managed engines restarted after exiting",
            registry=self.registry,
        )  # fmt: skip

    def observe_swap(self, variant: str, seconds: float, ok: bool) -> None:
        self.swaps.labels(variant=variant, result="ok" if ok else "error").inc()
        if ok:
            self.swap_seconds.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
