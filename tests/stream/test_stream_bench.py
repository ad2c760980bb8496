"""``slidr bench`` runs end to end on tiny sizes (a smoke test: no timing is asserted)."""

from __future__ import annotations

from events.settings import Settings
from stream.bench import BenchOptions, run_bench


def test_stream_bench_runs_every_part_on_tiny_sizes(stack) -> None:
    settings = stack.settings.replace(batch_size=200)
    options = BenchOptions(stream_clicks=3000, rate=200.0, latency_seconds=2.0, offline=False)
    report = run_bench(settings, options, progress=lambda _m: None)
    assert report["machine"]["cores"] >= 1
    path = report["scoring_path"]
    assert path["batch_500"]["per_click"]["n"] > 0 and path["batch_1"]["per_click"]["n"] > 0
    throughput = report["throughput"]
    assert throughput["faust_worker_aiokafka"]["complete"]
    assert throughput["plain_loop"]["clicks"] == 3000
    latency = report["latency"]
    assert latency["slidr_end_to_end"]["decided"] == latency["slidr_end_to_end"]["of"] > 0
    assert latency["bare_round_trip"]["received"] == latency["bare_round_trip"]["of"]
    assert len(latency["slidr_end_to_end"]["p99_by_sixth_ms"]) == 6  # 400 clicks in sixths
    for phase in ("scoring_path", "throughput", "latency"):  # machine drift, phase by phase
        assert set(report[phase]["cpu_probe_ms"]) == {"before", "after"}
    assert isinstance(settings, Settings)
