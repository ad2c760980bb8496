"""Publishing with delivery tracking: a batch is "safe" only once the broker has it."""

from __future__ import annotations

import asyncio
import time

import pytest
from confluent_kafka import Consumer, TopicPartition

from slidr.settings import Settings
from stream.engine import BatchResult
from stream.kafka import DECISIONS, consumer_config
from stream.publisher import AckPipeline, DeliveryError, Publisher


def _read_all(settings: Settings, topic: str, expected: int, timeout_s: float = 20.0) -> list[bytes]:
    consumer = Consumer(consumer_config(settings, f"{settings.group_id}-read"))
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    keys: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(keys) < expected and time.monotonic() < deadline:
        keys.extend(m.key() for m in consumer.consume(500, 0.2) if m.error() is None)
    consumer.close()
    return keys


def test_batches_become_safe_once_on_the_broker(stream_settings: Settings) -> None:
    publisher = Publisher(stream_settings)
    pipeline = AckPipeline(publisher, max_in_flight=2)
    safe: list[int] = []

    async def run() -> None:
        for n in range(5):  # more batches than may be in flight: submit must wait, not fail
            result = BatchResult(
                decisions=[(f"c{n}-{i}".encode(), b"{}") for i in range(100)],
                dead_letters=[(None, b"{}")] if n == 0 else [],
            )
            await pipeline.submit(result, lambda n=n: safe.append(n))
            assert pipeline.in_flight <= 2
        await pipeline.publish(BatchResult())  # nothing to send: settles at once
        deadline = time.monotonic() + 20
        while pipeline.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    try:
        asyncio.run(run())
    finally:
        publisher.close()
    assert sorted(safe) == [0, 1, 2, 3, 4]
    keys = _read_all(stream_settings, stream_settings.topic(DECISIONS), 500)
    assert len(set(keys)) == 500  # every decision of every safe batch is readable


def test_a_refused_batch_is_never_safe_and_stops_the_pipeline(stream_settings: Settings) -> None:
    # A topic that does not exist (and is never auto-created): librdkafka gives up on
    # the message after message.timeout.ms and reports the error.
    missing = stream_settings.replace(topic_prefix=stream_settings.topic_prefix + "missing-")
    publisher = Publisher(missing, **{"message.timeout.ms": 1500})
    pipeline = AckPipeline(publisher)
    safe: list[int] = []

    async def run() -> None:
        with pytest.raises(DeliveryError, match="refused"):
            await pipeline.publish(BatchResult(decisions=[(b"k", b"{}")]))
        with pytest.raises(DeliveryError):  # later batches are refused too
            await pipeline.submit(BatchResult(decisions=[(b"k2", b"{}")]), lambda: safe.append(1))

    try:
        asyncio.run(run())
    finally:
        publisher.close(timeout_s=0)  # nothing left worth flushing
    assert safe == []


def test_a_failure_to_serve_reports_stops_the_pipeline(stream_settings: Settings) -> None:
    """Were serving delivery reports to fail, no batch could be confirmed again: the
    pipeline stops (and the worker with it) instead of waiting forever."""
    publisher = Publisher(stream_settings)
    stopped: list[DeliveryError] = []
    pipeline = AckPipeline(publisher, on_failure=stopped.append)

    producer = publisher.producer

    class FailingPoll:  # as a delivery callback raising inside poll would
        def poll(self, _timeout: float) -> int:
            raise RuntimeError("callback failed")

    async def run() -> None:
        await pipeline.publish(BatchResult(decisions=[(b"k", b"{}")]))  # serving works
        publisher.producer = FailingPoll()
        await asyncio.sleep(0.05)  # the serving task meets the failure
        with pytest.raises(DeliveryError, match="serving delivery reports failed"):
            await pipeline.submit(BatchResult(decisions=[(b"k2", b"{}")]), lambda: None)

    try:
        asyncio.run(run())
    finally:
        publisher.producer = producer
        publisher.close()
    assert len(stopped) == 1
