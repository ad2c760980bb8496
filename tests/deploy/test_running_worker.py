"""A running ``slidr worker`` answers its probes as the manifests expect, and exports every
metric the Grafana dashboard and the Prometheus alert rules query, checked by scraping
its ``/metrics`` after it decided some clicks (and dead-lettered one)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from stream.local_stack import free_port
from tests.deploy.manifests import exported_names, queried_metrics
from tests.stream.test_worker import DECIDE_S, JOIN_S, clicks_of
from tests.stream.worker_harness import (
    DecisionReader,
    click_record,
    produce_records,
    unique,
    wait_until,
)

# Why /readyz may answer 503 while a worker starts (stream.health).
STARTING_REASONS = ("no partitions assigned", "no model loaded", "restoring partitions ")


def get(port: int, path: str) -> tuple[int, dict | str]:
    """(status, body) of ``http://127.0.0.1:port/path``; JSON bodies parsed; (0, why)
    while nothing listens yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except OSError as error:  # not listening yet
        return 0, str(error)
    text = raw.decode()
    return status, json.loads(text) if path != "/metrics" else text


def test_probes_and_every_queried_metric_on_a_running_worker(
    worker_settings, workers, dataset, trained_model
) -> None:
    port = free_port()
    worker = workers.new("probed", unique("g"), SLIDR_METRICS_PORT=str(port))
    clicks = clicks_of(dataset, 0, 600)
    reader = DecisionReader(worker_settings)
    readiness: list[tuple[int, dict | str]] = []

    def ready() -> bool:
        readiness.append(get(port, "/readyz"))
        return readiness[-1][0] == 200 or not worker.running

    try:
        worker.start()
        assert wait_until(lambda: get(port, "/healthz")[0] == 200 or not worker.running, JOIN_S)
        assert wait_until(ready, JOIN_S, step=0.2), f"never ready:\n{worker.log_tail()}"
        assert worker.running, worker.log_tail()
        status, body = get(port, "/healthz")
        produce_records(worker_settings, [click_record(c) for c in clicks])
        produce_records(worker_settings, [(b"u-bad", b"not json")])  # a dead letter
        missing = reader.wait_for([c["click_id"] for c in clicks], DECIDE_S, lambda: worker.running)
        assert not missing, f"{len(missing)} clicks undecided:\n{worker.log_tail()}"
        wanted = queried_metrics()
        exported: set[str] = set()

        def everything_exported() -> bool:
            # The lag gauge is set every 5 s and the dead letter may trail the decisions.
            nonlocal exported
            scraped = get(port, "/metrics")
            assert scraped[0] == 200, scraped
            exported = exported_names(text_string_to_metric_families(str(scraped[1])))
            return wanted.keys() <= exported or not worker.running

        wait_until(everything_exported, 30, step=0.5)
        metrics_text = str(get(port, "/metrics")[1])
    finally:
        reader.close()

    # Liveness: the event loop turns.
    assert status == 200 and body["status"] == "alive", body
    # Readiness: every 503 before it named a starting reason; then all partitions, the model.
    for code, why in readiness[:-1]:
        assert code in (0, 503), (code, why)
        if code == 503:
            assert isinstance(why, dict) and why["reason"].startswith(STARTING_REASONS), why
    code, why = readiness[-1]
    assert code == 200, why
    assert isinstance(why, dict)
    assert why["partitions"] == list(range(worker_settings.partitions))
    assert why["model_version"] == trained_model.version
    # Every metric the dashboard and the rules query is exported.
    absent = {name: sorted(where) for name, where in wanted.items() if name not in exported}
    assert not absent, f"queried but not exported by a running worker: {absent}"
    # The end-to-end latency histogram was filled: one observation per decided click.
    families = {f.name: f for f in text_string_to_metric_families(metrics_text)}
    latency = families["slidr_decision_latency_seconds"]
    count = next(s.value for s in latency.samples if s.name.endswith("_count"))
    assert count >= len(clicks)
