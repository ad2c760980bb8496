"""The worker's health facts (``stream.health``) and the histogram filled a batch at a
time (``stream.metrics.BatchHistogram``), without a worker; tests/deploy runs them in one."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry, Histogram

from stream.health import WorkerHealth
from stream.local_stack import free_port
from stream.metrics import BatchHistogram, WorkerMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_liveness_follows_the_event_loop_beat() -> None:
    clock = Clock()
    health = WorkerHealth(lambda: "v0001", stall_after_s=30.0, clock=clock)
    assert health.liveness()[0]  # alive from construction: the loop has not started yet
    clock.now += 31
    alive, why = health.liveness()
    assert not alive and why["status"] == "stalled"
    health.beat()
    assert health.liveness()[0]
    health.stopped("delivery failed")
    alive, why = health.liveness()
    assert not alive and why == {"status": "stopped", "reason": "delivery failed"}


def test_readiness_needs_partitions_and_a_model() -> None:
    version: list[str | None] = [None]
    health = WorkerHealth(lambda: version[0])
    assert health.readiness()[1]["reason"] == "no model loaded"
    version[0] = "v0002"
    assert health.readiness()[1]["reason"] == "no partitions assigned"
    health.assigned([3, 1])
    assert health.readiness() == (
        True,
        {"status": "ready", "partitions": [1, 3], "model_version": "v0002"},
    )
    health.restoring([3])
    ready, why = health.readiness()
    assert not ready and why["reason"] == "restoring partitions 3"
    health.restored([3])
    assert health.readiness()[0]
    health.restoring([5])  # not this worker's any more: does not hold readiness back
    assert health.readiness()[0]
    health.revoked([1, 3])
    assert not health.readiness()[0]
    health.assigned([0])
    health.stopped("shutting down")
    ready, why = health.readiness()
    assert not ready and why["reason"] == "stopped: shutting down"


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_probes_and_metrics_share_one_port() -> None:
    health = WorkerHealth(lambda: "v0001")
    metrics = WorkerMetrics()
    metrics.clicks_in.inc(2)
    server = metrics.serve(free_port(), health=health)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, body = _get(f"{base}/readyz")
        assert status == 503
        assert json.loads(body)["reason"] == "no partitions assigned"
        health.assigned([0])
        assert _get(f"{base}/readyz")[0] == 200
        assert _get(f"{base}/healthz")[0] == 200
        assert b"slidr_clicks_in_total 2.0" in _get(f"{base}/metrics")[1]
    finally:
        server.shutdown()
        server.server_close()


def test_batch_histogram_equals_observing_one_value_at_a_time() -> None:
    buckets = (0.01, 0.1, 1.0)
    values = [0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 7.0, 0.1]
    batched, single = CollectorRegistry(), CollectorRegistry()
    BatchHistogram("h_seconds", "h", buckets, batched).observe_many(values)
    one_by_one = Histogram("h_seconds", "h", buckets=buckets, registry=single)
    for v in values:
        one_by_one.observe(v)

    def samples(registry: CollectorRegistry) -> dict:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(batched) == samples(single)


def test_a_revoked_partitions_lag_is_no_longer_exported() -> None:
    metrics = WorkerMetrics()
    metrics.consumer_lag.labels(partition="0").set(5)
    metrics.consumer_lag.labels(partition="1").set(7)
    metrics.forget_partitions({1, 3})  # 3 was never reported
    (family,) = [f for f in metrics.registry.collect() if f.name == "slidr_consumer_lag"]
    assert {s.labels["partition"]: s.value for s in family.samples} == {"0": 5.0}
