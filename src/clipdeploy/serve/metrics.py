"""Prometheus metrics of one app, in a registry of its own (two apps in one process do not mix)."""

from __future__ import annotations

from typing import Any

from clipdeploy.deps import require

# Request latency buckets in seconds: a CPU image embedding takes tens of ms, a queued one more.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The counters and histograms `/metrics` shows."""

    def __init__(self) -> None:
        prom = require("prometheus_client", "serve")
        self.prom = prom
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("clipdeploy_requests", "HTTP requests answered, by route and status",
                                     ["route", "status"], registry=r)  # fmt: skip
        self.latency = prom.Histogram("clipdeploy_request_seconds", "time from request to response, by route",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = prom.Histogram("clipdeploy_batch_size", "items per inference call, by model and tower",
                                         ["model", "tower"], buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.queue_depth = prom.Gauge("clipdeploy_queue_depth", "items admitted and not yet answered",
                                      ["model", "tower"], registry=r)  # fmt: skip
        self.items = prom.Counter("clipdeploy_items_embedded", "items embedded, by model and tower",
                                  ["model", "tower"], registry=r)  # fmt: skip

    def render(self) -> tuple[bytes, str]:
        return self.prom.generate_latest(self.registry), self.prom.CONTENT_TYPE_LATEST

    def watch_depth(self, model: str, tower: str, batcher: Any) -> None:
        self.queue_depth.labels(model, tower).set_function(lambda: batcher.depth)
