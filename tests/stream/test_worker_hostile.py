"""A hostile message never holds a partition (issue 12): the worker dead-letters a
200 KB click of control bytes and a 2 MB click in the middle of a few thousand valid
ones, decides every valid click, and commits every partition to its end."""

from __future__ import annotations

import hashlib

from confluent_kafka import Producer

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


def test_hostile_clicks_are_dead_lettered_and_every_partition_commits(
    worker_settings, workers, dataset
) -> None:
    valid = clicks_of(dataset, 0, 3000)
    control = bytes(range(32)) * (200 * 1024 // 32)  # 200 KB of control bytes
    big = b'{"click_id": "big", "pad": "' + b"x" * (2 * 1024 * 1024) + b'"}'  # 2 MB
    hostile = [(b"hostile-control", control), (b"hostile-big", big)]

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
        for produced, (_key, value) in zip(landed_bad, hostile, strict=True):
            record, letter = letters[(produced.partition, produced.offset)]
            assert len(record.value) <= MAX_DEAD_LETTER_BYTES
            assert letter["original_bytes"] == len(value)
            assert letter["original_sha256"] == hashlib.sha256(value).hexdigest()
            assert letter["truncated"] is True and letter["error"]
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
    finally:
        producer.close()
        decisions.close()
        dlq.close()
