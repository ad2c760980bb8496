"""Prometheus metrics of the stream worker (served on ``SLIDR_METRICS_PORT`` when set, on
``SLIDR_METRICS_HOST``: 127.0.0.1 unless opened)."""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class WorkerMetrics:
    """All worker metrics in one registry, so tests and benchmarks can make their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.clicks_in = Counter("slidr_clicks_in", "Click messages consumed", registry=r)
        self.decisions_out = Counter(
            "slidr_decisions_out", "Decisions produced", ["verdict", "slice"], registry=r
        )
        self.duplicates = Counter(
            "slidr_redelivered_clicks", "Clicks decided before (re-emitted decision)", registry=r
        )
        self.dlq = Counter(
            "slidr_dlq", "Messages sent to the dead-letter topic", ["topic"], registry=r
        )
        self.degraded = Counter(
            "slidr_degraded_decisions", "Decisions made with a fallback (Redis down)", registry=r
        )
        self.late = Counter(
            "slidr_late_clicks", "Clicks older than the allowed lateness", registry=r
        )
        self.stale_batches = Counter(
            "slidr_stale_batches",
            "Click batches fetched before a rebalance, left to the new owner",
            registry=r,
        )
        self.batch_retries = Counter(
            "slidr_batch_retries",
            "Click batches that failed and were tried again whole",
            registry=r,
        )
        self.batch_fallbacks = Counter(
            "slidr_batch_fallbacks",
            "Click batches that kept failing and were decided click by click",
            registry=r,
        )
        self.purchases_in = Counter("slidr_purchases_in", "Purchase messages consumed", registry=r)
        self.batch_size = Histogram(
            "slidr_batch_size",
            "Clicks per micro-batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.scoring_seconds = Histogram(
            "slidr_batch_seconds",
            "Feature update, lookup and inference per micro-batch",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.model_version = Gauge(
            "slidr_model_info", "Active model version (value 1)", ["version"], registry=r
        )
        self.consumer_lag = Gauge(
            "slidr_consumer_lag",
            "Clicks between the committed offset and the end of the topic",
            ["partition"],
            registry=r,
        )
        self.model_swaps = Counter(
            "slidr_model_swaps", "Model versions loaded while running", registry=r
        )
        self.control_refused = Counter(
            "slidr_control_refused",
            "Control messages not acted on (bad version name, guardrails, input width, "
            "pinned, ...)",
            ["reason"],
            registry=r,
        )
        self.control_errors = Counter(
            "slidr_control_errors",
            "Errors reading the control topic (the follower retries with backoff)",
            registry=r,
        )

    def set_model(self, version: str) -> None:
        self.model_version.clear()
        self.model_version.labels(version=version).set(1)

    def serve(self, port: int, host: str = "127.0.0.1") -> WSGIServer:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; returns the server
        (``shutdown()`` stops it). Loopback by default: the endpoint has no
        authentication, so ``SLIDR_METRICS_HOST`` opens it on purpose only."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
