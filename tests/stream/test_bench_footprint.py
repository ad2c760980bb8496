"""``slidr bench``'s footprint phase counts what clicks cost Redis and RocksDB, and leaves
the Redis it measured as it found it."""

from __future__ import annotations

import redis

from stream.bench_footprint import measure_footprint


def test_footprint_counts_redis_work_and_rocksdb_records(
    worker_settings, trained_model, dataset, tmp_path
) -> None:
    clicks = 1200
    client = redis.Redis.from_url(worker_settings.redis_url)
    report = measure_footprint(
        worker_settings, trained_model.registry, trained_model.data, clicks, tmp_path
    )
    users = len({dataset.clicks.row(i)["user_id"] for i in range(clicks)})
    assert report["clicks"] == clicks and report["users"] == users
    assert report["degraded_batches"] == 0
    r = report["redis"]
    # Script calls per batch (3 batches of at most 500), not per click; each runs several
    # commands per click.
    assert 3 <= round(r["round_trips_per_click"] * clicks) <= 3 * 2
    assert r["commands_per_click"] > 1 and r["net_in_bytes_per_click"] > 0
    assert sum(w["keys"] for w in r["keys_by_window"].values()) > 0
    rocks = report["rocksdb"]["records"]
    assert rocks["user"]["records"] == users  # one record per user
    assert rocks["decided_click"]["records"] == clicks  # every decision indexed
    assert rocks["decided_click_day_index"]["records"] == clicks
    try:
        # The run's keys are gone (counted under the test's own prefix: other tests' keys
        # in the shared Redis expire meanwhile, so the database size says nothing).
        assert not list(client.scan_iter(match=f"{worker_settings.redis_key_prefix}*"))
    finally:
        client.close()
