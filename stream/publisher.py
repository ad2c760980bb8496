"""Producing decisions, dead letters and served features with confluent-kafka.

Faust's own producer costs ~100 µs a message (FINDINGS.md); librdkafka batches in C.
``publish`` returns only once every message of the batch is acknowledged by the broker,
so the caller can commit the batch's offsets afterwards (at least once).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from confluent_kafka import KafkaException, Producer

from slidr.settings import Settings
from stream.engine import BatchResult
from stream.kafka import CLICKS_DLQ, DECISIONS, FEATURES_SERVED, producer_config


class DeliveryError(RuntimeError):
    """The broker refused a message; the batch must not be committed."""


class Publisher:
    def __init__(self, settings: Settings, **overrides) -> None:
        self.producer = Producer(producer_config(settings, **overrides))
        self.decisions_topic = settings.topic(DECISIONS)
        self.dlq_topic = settings.topic(CLICKS_DLQ)
        self.features_topic = settings.topic(FEATURES_SERVED)
        self._errors: list[str] = []

    def _on_delivery(self, err, _msg) -> None:
        if err is not None:
            self._errors.append(str(err))

    def _produce(self, topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> None:
        produce = self.producer.produce
        for key, value in records:
            while True:
                try:
                    produce(topic, value=value, key=key, on_delivery=self._on_delivery)
                    break
                except BufferError:  # local queue full: let librdkafka drain it
                    self.producer.poll(0.05)

    def send(self, result: BatchResult) -> None:
        """Queue a batch's messages (non-blocking)."""
        self._produce(self.decisions_topic, result.decisions)
        self._produce(self.dlq_topic, result.dead_letters)
        self._produce(self.features_topic, result.served_features)

    def wait(self, timeout_s: float = 30.0) -> None:
        """Block until everything queued is acknowledged; raise on any failure."""
        remaining = self.producer.flush(timeout_s)
        if remaining:
            raise DeliveryError(f"{remaining} messages not acknowledged within {timeout_s} s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise DeliveryError(f"{len(errors)} messages refused by the broker: {errors[0]}")

    async def publish(self, result: BatchResult) -> None:
        """``send`` then ``wait`` without blocking the event loop."""
        self.send(result)
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.wait)
        except KafkaException as exc:
            raise DeliveryError(str(exc)) from exc

    def close(self) -> None:
        self.producer.flush(10)
