"""Prometheus metrics of the gateway, in a registry of its own (one per app).

Naming follows Prometheus conventions: prefix `deltagate_`, base units (seconds), `_total`
counters. Labels take bounded values only: `variant` is a registered model name (requests are
counted after the name resolved), `engine` a base name, `endpoint` one of the two OpenAI routes,
`status_class` 2xx/4xx/5xx. State that already lives in the swap slots (resident variant,
in-flight requests) is read at scrape time by a collector instead of being mirrored per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.swap import SwapRecord
    from server.tenancy import Principal

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SWAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


@dataclass(frozen=True)
class EngineState:
    """What the scrape reads from one engine's slot."""

    id: str  # the engine's id (the metrics' `engine` label)
    resident: str | None
    variants: tuple[str, ...]  # every model name served by this engine (its base and variants)
    inflight: int
    queued: int = 0  # requests waiting for their variant's weights (a swap)


class _SlotCollector(Collector):
    def __init__(self, states: Callable[[], Iterable[EngineState]]):
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        resident = GaugeMetricFamily(
            "deltagate_resident_variant",
            "1 for the variant whose weights an engine holds, 0 for its others",
            labels=["engine", "variant"],
        )
        inflight = GaugeMetricFamily(
            "deltagate_inflight_requests",
            "Requests admitted on an engine and not finished",
            labels=["engine"],
        )
        queued = GaugeMetricFamily(
            "deltagate_queued_requests",
            "Requests waiting on an engine for their variant's weights (a swap, see the swap policy)",
            labels=["engine"],
        )
        for s in self._states():
            for variant in s.variants:
                resident.add_metric([s.id, variant], 1.0 if variant == s.resident else 0.0)
            inflight.add_metric([s.id], s.inflight)
            queued.add_metric([s.id], s.queued)
        yield resident
        yield inflight
        yield queued


class Metrics:
    """Counters and histograms the gateway updates; `render` is the /metrics body."""

    def __init__(self, version: str) -> None:
        r = self.registry = CollectorRegistry()
        Info("deltagate_build", "deltagate version", registry=r).info({"version": version})
        self.requests = Counter(
            "deltagate_requests_total",
            "Inference requests by variant, endpoint and status class",
            ["variant", "endpoint", "status_class"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "deltagate_request_duration_seconds",
            "End-to-end inference latency, swap wait included",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "deltagate_time_to_first_token_seconds",
            "Arrival to the first streamed chunk",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "deltagate_prompt_tokens_total", "Prompt tokens, from the engine's usage", ["variant"], registry=r
        )
        self.generation_tokens = Counter(
            "deltagate_generation_tokens_total",
            "Generated tokens, from the engine's usage",
            ["variant"],
            registry=r,
        )
        self.swap_wait_seconds = Histogram(
            "deltagate_swap_wait_seconds",
            "Time a request waited for its variant's weights to be resident",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.swaps = Counter(
            "deltagate_swaps_total",
            "Weight swaps by engine (its id, as on every deltagate metric) and result",
            ["engine", "result"],
            registry=r,
        )
        self.swap_seconds = Histogram(
            "deltagate_swap_duration_seconds",
            "Engine pause of successful weight swaps",
            ["engine"],
            buckets=SWAP_BUCKETS,
            registry=r,
        )
        self.swap_staging_seconds = Histogram(
            "deltagate_swap_staging_seconds",
            "Time the engine merged a swap's tensors in the background while still serving the previous "
            "variant (swaps staged so; the pause itself is deltagate_swap_duration_seconds)",
            ["engine"],
            buckets=SWAP_BUCKETS,
            registry=r,
        )
        self.swap_modules = Counter(
            "deltagate_swap_modules_total",
            "Modules rewritten by successful swaps, by how: prepared (committed from the kernel form staged "
            "while serving) or reloaded (vLLM's reload in the pause: the fallback)",
            ["engine", "how"],
            registry=r,
        )
        self.swap_prepared_bytes = Histogram(
            "deltagate_swap_prepared_bytes",
            "Memory a swap's prepared modules held while staged",
            ["engine"],
            buckets=(2**20, 2**24, 2**26, 2**28, 2**30, 2**32, 2**34),
            registry=r,
        )
        self.swap_bytes = Counter(
            "deltagate_swap_bytes_total",
            "Bytes of weights rewritten by successful swaps",
            ["engine"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "deltagate_engine_restarts_total",
            "Managed engines restarted after exiting",
            ["engine"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "deltagate_upstream_errors_total",
            "Engine failures seen by the relay: connect, status (engine 5xx), stream (broke mid-response)",
            ["engine", "kind"],
            registry=r,
        )

        self.alias_requests = Counter(
            "deltagate_alias_requests_total",
            "Inference requests that named an alias, by alias, the target variant that served them and "
            "status class",
            ["alias", "variant", "status_class"],
            registry=r,
        )
        # Labelled by key name: as many series as keys root creates (and "root", "api-key", "anonymous")
        self.key_requests = Counter(
            "deltagate_key_requests_total",
            "Inference requests by project, key name, model and status class",
            ["project", "key", "model", "status_class"],
            registry=r,
        )
        self.key_tokens = Counter(
            "deltagate_key_tokens_total",
            "Tokens by project, key name, model and kind (prompt, completion), from the engine's usage",
            ["project", "key", "model", "kind"],
            registry=r,
        )
        self.stalled_streams = Counter(
            "deltagate_stalled_streams_total",
            "Streams ended because the client read nothing for --stream-write-timeout seconds",
            ["variant"],
            registry=r,
        )

    def watch_engines(self, states: Callable[[], Iterable[EngineState]]) -> None:
        """Report resident variant and in-flight requests per engine from `states()` at each scrape."""
        self.registry.register(_SlotCollector(states))

    def observe_swap(self, engine: str, record: SwapRecord) -> None:
        """Count one swap; time its pause and, if it was staged while serving, its staging."""
        self.swaps.labels(engine=engine, result="ok" if record.ok else "error").inc()
        if record.ok:
            self.swap_seconds.labels(engine=engine).observe(record.seconds)
            self.swap_bytes.labels(engine=engine).inc(record.bytes)
            self.swap_modules.labels(engine=engine, how="prepared").inc(record.prepared_modules)
            self.swap_modules.labels(engine=engine, how="reloaded").inc(record.fallback_modules)
            if record.prepared_modules:
                self.swap_prepared_bytes.labels(engine=engine).observe(record.prepared_bytes)
            if record.staged:
                self.swap_staging_seconds.labels(engine=engine).observe(record.staging_seconds)

    def observe_usage(self, variant: str, usage: dict) -> None:
        """Count tokens from an OpenAI `usage` object."""
        self.prompt_tokens.labels(variant).inc(usage.get("prompt_tokens") or 0)
        self.generation_tokens.labels(variant).inc(usage.get("completion_tokens") or 0)

    def observe_request(self, variant: str, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(variant, endpoint, f"{status // 100}xx").inc()
        self.request_seconds.labels(variant).observe(seconds)

    def observe_key(self, caller: Principal, model: str, status: int, usage: dict | None) -> None:
        """Count a request and its tokens under the caller's key name (never its secret)."""
        project = caller.project or ""
        self.key_requests.labels(project, caller.name, model, f"{status // 100}xx").inc()
        for kind in ("prompt_tokens", "completion_tokens"):
            self.key_tokens.labels(project, caller.name, model, kind.split("_")[0]).inc(
                (usage or {}).get(kind) or 0
            )

    def observe_alias(self, alias: str, variant: str, status: int) -> None:
        self.alias_requests.labels(alias, variant, f"{status // 100}xx").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def lora_requests_info(
    engines: Iterable[tuple[str | None, Iterable[str], dict[str, str]]], now: float
) -> str:
    """vLLM's `vllm:lora_requests_info` gauge, as deltagate's slots see it: per engine (resident
    variant, variants waiting for a swap, extra labels such as the Ray replica), the resident variant
    is the running "adapter", waiting ones are waiting, one at a time. Routers that place requests by
    adapter residency (llm-d's scheduler) read these labels; the value is a timestamp, as vLLM's."""
    lines = [
        "# HELP vllm:lora_requests_info Running stats on lora requests (deltagate: variant residency).",
        "# TYPE vllm:lora_requests_info gauge",
    ]
    for resident, waiting, extra in engines:
        labels = {
            "max_lora": "1",
            "running_lora_adapters": resident or "",
            "waiting_lora_adapters": ",".join(sorted(waiting)),
            **extra,
        }
        text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"vllm:lora_requests_info{{{text}}} {now}")
    return "\n".join(lines) + "\n"
