"""Prometheus metrics (one registry per app, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401 - re-exported for the route
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorasae_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "lorasae_request_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "lorasae_batch_rows", "sequences per forward", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.batch_tokens = Histogram(
            "lorasae_batch_tokens",
            "real tokens per forward",
            buckets=(16, 64, 256, 1024, 4096, 16384, 65536),
            registry=r,
        )
        self.forward_seconds = Histogram(
            "lorasae_forward_seconds", "engine time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("lorasae_tokens", "tokens processed", registry=r)
        self.queue_depth = Gauge("lorasae_queue_depth", "sequences waiting for a batch", registry=r)
        self.rejected = Counter("lorasae_rejected", "requests refused because the queue was full", registry=r)
        self.adapters = Gauge("lorasae_adapters", "registered adapters", registry=r)
        self.generations = Gauge("lorasae_generations_active", "generations holding a slot", registry=r)
        self.generated_tokens = Counter("lorasae_generated_tokens", "tokens generated", registry=r)
        # adapter residency, read from the engine at each scrape (``observe_residency``)
        self.adapters_held = Gauge(
            "lorasae_adapters_held",
            "adapters in the model (hot) / in host memory (cpu)",
            ["tier"],
            registry=r,
        )
        self.adapter_loads = Gauge(
            "lorasae_adapter_loads",
            "adapter loads into the model since start, by source tier",
            ["tier"],
            registry=r,
        )
        self.adapter_load_seconds = Gauge(
            "lorasae_adapter_load_seconds",
            "seconds spent loading adapters, by source tier",
            ["tier"],
            registry=r,
        )
        self.adapter_hits = Gauge("lorasae_adapter_hits", "adapter uses that found it loaded", registry=r)
        self.adapter_evictions = Gauge(
            "lorasae_adapter_evictions", "adapters evicted from the model", registry=r
        )

    def observe_residency(self, snapshot: dict) -> None:
        """Copy ``Residency.snapshot()`` into the gauges."""
        self.adapters_held.labels("hot").set(len(snapshot["hot"]))
        self.adapters_held.labels("cpu").set(len(snapshot["cpu"]))
        for tier, count in snapshot["loads"].items():
            self.adapter_loads.labels(tier).set(count)
            self.adapter_load_seconds.labels(tier).set(snapshot["load_seconds"][tier])
        self.adapter_hits.set(snapshot["hits"])
        self.adapter_evictions.set(snapshot["evicted"])

    def observe_batch(self, rows: int, tokens: int, seconds: float) -> None:
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(tokens)
        self.forward_seconds.observe(seconds)
        self.tokens.inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
