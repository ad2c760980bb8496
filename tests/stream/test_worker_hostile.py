"""A hostile message never holds a partition (issue 12): the worker dead-letters a
200 KB click of control bytes, a 2 MB click and a click stamped in the year 2999 in the
middle of a few thousand valid ones, refuses control messages naming a path-like or an
unknown model version (and keeps deciding with its model), decides every valid click,
and commits every partition to its end."""

from __future__ import annotations

import hashlib

import orjson
from confluent_kafka import Producer

from stream.control import publish_control
from stream.engine import MAX_DEAD_LETTER_BYTES
from stream.kafka import CLICKS, producer_config
from tests.stream.test_worker import DECIDE_S, clicks_of, committed_offsets
from tests.stream.worker_harness import (
    DecisionReader,
    RecordProducer,
    click_record,
    dlq_reader,
    unique,
    wait_until,
)

# Control messages no worker may act on: a path, and a version not in the registry.
HOSTILE_VERSIONS = ("/tmp/x", "v9999")


def refusals(worker) -> int:
    """How many control messages the worker has refused so far (from its log)."""
    return worker.log_text().count("control: refused")


def test_hostile_clicks_are_dead_lettered_and_every_partition_commits(
    worker_settings, workers, dataset, trained_model
) -> None:
    valid = clicks_of(dataset, 0, 3000)
    control = bytes(range(32)) * (200 * 1024 // 32)  # 200 KB of control bytes
    big = b'{"click_id": "big", "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'  # 2 MB
    # Valid in every field but its time: the year 2999 (under LATEST_TS, far ahead).
    future = {**valid[0], "click_id": unique("future"), "ts": 32_000_000_000.0}
    hostile = [
        (b"hostile-control", control),
        (b"hostile-big", big),
        (future["user_id"].encode(), orjson.dumps(future)),
    ]
    truncated = {b"hostile-control": True, b"hostile-big": True}

    group = unique("g")
    worker = workers.new("worker", group).start()
    decisions, dlq = DecisionReader(worker_settings), dlq_reader(worker_settings)
    producer = RecordProducer(worker_settings)
    # librdkafka refuses to send over message.max.bytes (1 MB): this producer may.
    producer.producer.close()
    producer.producer = Producer(
        producer_config(worker_settings, **{"message.max.bytes": 4_000_000})
    )
    producer.topic = worker_settings.topic(CLICKS)
    try:
        half = len(valid) // 2
        landed = producer.send([click_record(c) for c in valid[:half]])
        missing = decisions.wait_for(
            [c["click_id"] for c in valid[:half]], DECIDE_S, lambda: worker.running
        )
        assert not missing, f"{len(missing)} clicks undecided:\n{workers.describe()}"
        # The worker follows the control topic from its end as of its start: both are
        # read, refused, and the clicks after them are decided with the same model.
        for version in HOSTILE_VERSIONS:
            publish_control(worker_settings, "activate", version, "hostile test")
        assert wait_until(
            lambda: refusals(worker) >= len(HOSTILE_VERSIONS) or not worker.running, 30
        ), f"control messages not refused:\n{workers.describe()}"
        assert worker.running, workers.describe()
        landed_bad = producer.send(hostile)
        landed += landed_bad + producer.send([click_record(c) for c in valid[half:]])
        missing = decisions.wait_for(
            [c["click_id"] for c in valid], DECIDE_S, lambda: worker.running
        )
        assert not missing, f"{len(missing)} clicks undecided:\n{workers.describe()}"
        dlq.read_until(lambda records: len(records) >= len(hostile), 30, lambda: worker.running)
        letters = {
            (r["source"]["partition"], r["source"]["offset"]): (rec, r)
            for rec in dlq.records
            for r in [rec.json()]
        }
        for produced, (key, value) in zip(landed_bad, hostile, strict=True):
            record, letter = letters[(produced.partition, produced.offset)]
            assert len(record.value) <= MAX_DEAD_LETTER_BYTES
            assert letter["original_bytes"] == len(value)
            assert letter["original_sha256"] == hashlib.sha256(value).hexdigest()
            assert letter["truncated"] is truncated.get(key, False) and letter["error"]
        _record, letter = letters[(landed_bad[2].partition, landed_bad[2].offset)]
        assert "SLIDR_MAX_FUTURE_SKEW_S" in letter["error"], letter
        assert "ahead" in letter["error"], letter
        end: dict[int, int] = {}
        for record in landed:
            end[record.partition] = max(end.get(record.partition, 0), record.offset + 1)
        topic = worker_settings.topic(CLICKS)
        assert wait_until(
            lambda: committed_offsets(worker_settings, group, topic, end) == end, 30
        ), (
            f"committed {committed_offsets(worker_settings, group, topic, end)}, end {end}\n"
            f"{workers.describe()}"
        )
        assert worker.running, workers.describe()
        decisions.poll()
        assert future["click_id"] not in decisions.by_click, decisions.by_click[future["click_id"]]
        versions = {d["model_version"] for d in decisions.decisions}
        assert versions == {trained_model.version}, versions
        assert refusals(worker) == len(HOSTILE_VERSIONS), workers.describe()
    finally:
        producer.close()
        decisions.close()
        dlq.close()
