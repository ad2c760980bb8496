"""The worker's Prometheus endpoint: local unless a setting opens it."""

from __future__ import annotations

import urllib.request

from events.settings import Settings
from stream.local_stack import free_port
from stream.metrics import WorkerMetrics


def test_the_endpoint_binds_loopback_by_default() -> None:
    metrics = WorkerMetrics()
    metrics.clicks_in.inc(3)
    server = metrics.serve(free_port(), Settings().metrics_host)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert b"slidr_clicks_in_total 3.0" in answer.read()
    finally:
        server.shutdown()
        server.server_close()


def test_a_setting_opens_the_endpoint_to_every_interface() -> None:
    settings = Settings.from_env({"SLIDR_METRICS_HOST": "0.0.0.0"})
    server = WorkerMetrics().serve(free_port(), settings.metrics_host)
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        server.shutdown()
        server.server_close()
