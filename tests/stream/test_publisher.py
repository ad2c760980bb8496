"""Publishing with delivery tracking: a batch is "safe" only once the broker has it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time

import orjson
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from events.settings import Settings
from stream.engine import BatchResult
from stream.kafka import DECISIONS, consumer_config
from stream.publisher import AckPipeline, DeliveryError, Publisher


def _read_all(
    settings: Settings, topic: str, expected: int, timeout_s: float = 20.0
) -> list[bytes]:
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


# --- one message that cannot be produced (no broker: a fake producer) -----------------

LIMIT = 1_000_000  # the fake's message.max.bytes, librdkafka's default


class FakeProducer:
    """Queues messages and acknowledges them on ``poll``, as librdkafka would; refuses a
    message over ``LIMIT`` at once with MSG_SIZE_TOO_LARGE, and any message whose key is
    in ``broken`` with another KafkaException."""

    def __init__(self, broken: tuple[bytes, ...] = ()) -> None:
        self.broken = broken
        self.queued: list[tuple[str, bytes | None, bytes, object]] = []
        self.delivered: list[tuple[str, bytes | None, bytes]] = []

    def produce(self, topic, value, key=None, on_delivery=None) -> None:
        if key in self.broken:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION))
        if len(value) > LIMIT:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        self.queued.append((topic, key, value, on_delivery))

    def poll(self, _timeout: float = 0) -> int:
        queued, self.queued = self.queued, []
        for topic, key, value, on_delivery in queued:
            self.delivered.append((topic, key, value))
            on_delivery(None, None)
        return len(queued)

    def flush(self, _timeout: float = 0) -> int:
        self.poll()
        return 0


def _fake_publisher(producer: FakeProducer) -> Publisher:
    publisher = Publisher.__new__(Publisher)  # no broker, no librdkafka client
    publisher.producer = producer
    publisher.decisions_topic, publisher.dlq_topic = "decisions", "clicks.dlq"
    publisher.features_topic = "features"
    publisher._errors = []
    return publisher


def test_an_oversized_message_is_dead_lettered_and_its_batch_still_safe() -> None:
    producer = FakeProducer()
    pipeline = AckPipeline(_fake_publisher(producer), max_in_flight=2)
    huge = b"\x01" * 1_200_000
    safe: list[int] = []

    async def run() -> None:
        for n in range(20):  # many more such batches than slots: none may leak one
            result = BatchResult(decisions=[(b"a%d" % n, b"{}"), (b"big%d" % n, huge)])
            await asyncio.wait_for(pipeline.submit(result, lambda n=n: safe.append(n)), 5)
        await asyncio.wait_for(pipeline.publish(BatchResult(decisions=[(b"z", b"{}")])), 5)

    asyncio.run(run())
    assert pipeline.failure is None and pipeline.in_flight == 0
    assert safe == list(range(20))
    letters = [orjson.loads(v) for t, _, v in producer.delivered if t == "clicks.dlq"]
    assert len(letters) == 20
    letter = letters[0]
    assert "MSG_SIZE_TOO_LARGE" in letter["error"] and "decisions" in letter["error"]
    assert letter["original_bytes"] == len(huge) and letter["truncated"] is True
    assert letter["original_sha256"] == hashlib.sha256(huge).hexdigest()
    assert letter["source"]["topic"] == "decisions"
    assert base64.b64decode(letter["source"]["key"]) == b"big0"
    decided = {k for t, k, _ in producer.delivered if t == "decisions"}
    assert decided == {b"a%d" % n for n in range(20)} | {b"z"}


def test_a_produce_error_frees_the_slot_and_stops_the_pipeline() -> None:
    producer = FakeProducer(broken=(b"bad",))
    stopped: list[DeliveryError] = []
    pipeline = AckPipeline(_fake_publisher(producer), max_in_flight=1, on_failure=stopped.append)
    safe: list[int] = []
    failed: list[str] = []

    async def run() -> None:
        result = BatchResult(decisions=[(b"ok", b"{}"), (b"bad", b"{}"), (b"after", b"{}")])
        await pipeline.submit(result, lambda: safe.append(1), failed.append)
        for _ in range(20):  # the reports come in; the batch settles as refused
            if not pipeline.in_flight:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(DeliveryError, match="_UNKNOWN_PARTITION"):
            await asyncio.wait_for(pipeline.submit(BatchResult(), lambda: safe.append(2)), 5)

    asyncio.run(run())
    assert pipeline.in_flight == 0  # the slot is back
    assert safe == [] and len(failed) == 1 and "_UNKNOWN_PARTITION" in failed[0]
    assert len(stopped) == 1


def test_a_failing_send_frees_the_slot() -> None:
    publisher = _fake_publisher(FakeProducer())
    pipeline = AckPipeline(publisher, max_in_flight=1)

    def broken_send(_result, _done) -> None:
        raise TypeError("not bytes")

    publisher.send_tracked = broken_send

    async def run() -> None:
        with pytest.raises(DeliveryError, match="not bytes"):
            await pipeline.submit(BatchResult(decisions=[(b"k", b"{}")]), lambda: None)

    asyncio.run(run())
    assert pipeline.in_flight == 0 and pipeline.failure is not None


def test_send_and_wait_dead_letter_an_oversized_message_and_report_other_errors() -> None:
    producer = FakeProducer(broken=(b"bad",))
    publisher = _fake_publisher(producer)
    publisher.send(BatchResult(decisions=[(b"big", b"x" * 2_000_000), (b"k", b"{}")]))
    publisher.wait()
    assert [t for t, _, _ in producer.delivered] == ["clicks.dlq", "decisions"]
    publisher.send(BatchResult(decisions=[(b"bad", b"{}")]))
    with pytest.raises(DeliveryError, match="_UNKNOWN_PARTITION"):
        publisher.wait()


# --- commit order: a batch is safe only after every batch submitted before it ----------


class ManualPublisher:
    """``send_tracked`` keeps each batch's ``done``; the test answers them in any order,
    as delivery reports of batches on different partitions of the broker arrive."""

    def __init__(self) -> None:
        self.pending: list = []

    def send_tracked(self, _result: BatchResult, done) -> None:
        self.pending.append(done)

    def serve(self) -> None:
        pass


def _batch(n: int) -> BatchResult:
    return BatchResult(decisions=[(b"c%d" % n, b"{}")])


def test_batches_are_safe_in_submission_order_whatever_order_their_reports_come() -> None:
    """Batch N still in flight, N+1 acknowledged: N+1 must wait, or its offsets could be
    committed past N's (faust-streaming skips its gap check for a new group)."""
    publisher = ManualPublisher()
    pipeline = AckPipeline(publisher, max_in_flight=4)  # type: ignore[arg-type]
    safe: list[int] = []

    async def run() -> None:
        for n in range(3):
            await pipeline.submit(_batch(n), lambda n=n: safe.append(n))
        publisher.pending[1](None)  # N+1 acknowledged first
        publisher.pending[2](None)
        await asyncio.sleep(0)
        assert safe == []  # batch 0 is still in flight
        assert pipeline.in_flight == 3  # and the slots stay taken until released in order
        publisher.pending[0](None)
        await asyncio.sleep(0)
        assert safe == [0, 1, 2]
        assert pipeline.in_flight == 0

    asyncio.run(run())


def test_after_a_refused_batch_later_acknowledged_ones_are_never_safe() -> None:
    publisher = ManualPublisher()
    stopped: list[DeliveryError] = []
    pipeline = AckPipeline(publisher, max_in_flight=4, on_failure=stopped.append)  # type: ignore[arg-type]
    safe: list[int] = []
    failed: list[int] = []

    async def run() -> None:
        for n in range(3):
            await pipeline.submit(
                _batch(n), lambda n=n: safe.append(n), lambda _why, n=n: failed.append(n)
            )
        publisher.pending[2](None)
        publisher.pending[1]("Broker: Message size too large")
        await asyncio.sleep(0)
        assert len(stopped) == 1  # the worker stops at once
        publisher.pending[0](None)  # acknowledged, and nothing before it was refused
        await asyncio.sleep(0)

    asyncio.run(run())
    assert safe == [0] and failed == [1, 2]
    assert pipeline.in_flight == 0


def test_a_send_failing_behind_a_batch_in_flight_frees_its_slot_with_it() -> None:
    publisher = ManualPublisher()
    pipeline = AckPipeline(publisher, max_in_flight=2)  # type: ignore[arg-type]
    safe: list[int] = []
    failed: list[str] = []

    def broken_send(_result, _done) -> None:
        raise KafkaException(KafkaError(KafkaError._UNKNOWN_TOPIC))

    async def run() -> None:
        await pipeline.submit(_batch(0), lambda: safe.append(0))
        publisher.send_tracked = broken_send  # type: ignore[method-assign]
        with pytest.raises(DeliveryError, match="_UNKNOWN_TOPIC"):
            await pipeline.submit(_batch(1), lambda: safe.append(1), failed.append)
        assert pipeline.in_flight == 2  # released in order: after batch 0
        publisher.pending[0](None)
        await asyncio.sleep(0)

    asyncio.run(run())
    assert safe == [0] and len(failed) == 1
    assert pipeline.in_flight == 0
