"""Producing decisions, dead letters and served features with confluent-kafka.

Faust's own producer costs ~100 µs a message (FINDINGS.md); librdkafka batches in C.
Two ways to know a batch is safe before its offsets are committed (at least once):

- ``send`` then ``wait``: block until everything queued is acknowledged (the plain loop,
  replay);
- ``send_tracked``: return at once and call back when the broker has acknowledged every
  message of *this* batch. The worker uses it so that deciding the next batch overlaps
  the broker round trip of the previous one (``AckPipeline``).

Delivery reports are served by whoever calls ``Producer.poll``: here always the thread
that produces (the worker's event loop). A thread of its own would take the interpreter
lock once per report, 500 times a batch, from a loop that needs it for everything else.

A message librdkafka refuses at once for its size (MSG_SIZE_TOO_LARGE) is replaced by a
bounded dead letter saying why, so one message never holds its batch (and partition)
back; any other failure to queue counts as a refusal of the batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Producer

from events.errors import SlidrError
from events.settings import Settings
from stream.engine import BatchResult, bounded_dead_letter
from stream.kafka import CLICKS_DLQ, DECISIONS, FEATURES_SERVED, producer_config

log = logging.getLogger(__name__)


def _too_large(exc: BaseException) -> bool:
    """``produce`` refused the message at once for its size (over message.max.bytes)."""
    if not isinstance(exc, KafkaException) or not exc.args:
        return False
    err = exc.args[0]
    return isinstance(err, KafkaError) and err.code() == KafkaError.MSG_SIZE_TOO_LARGE


class DeliveryError(SlidrError, RuntimeError):
    """The broker refused a message; the batch must not be committed."""


class _BatchDelivery:
    """Counts one batch's delivery reports and calls ``done(error or None)`` after the last."""

    __slots__ = ("remaining", "error", "done")

    def __init__(self, count: int, done: Callable[[str | None], None]) -> None:
        self.remaining = count
        self.error: str | None = None
        self.done = done

    def report(self, err, _msg) -> None:
        if err is not None and self.error is None:
            self.error = str(err)
        self.remaining -= 1
        if self.remaining == 0:
            self.done(self.error)

    def unsent(self, count: int, error: str) -> None:
        """``count`` messages of the batch were never queued: they count as refused."""
        if self.error is None:
            self.error = error
        self.remaining -= count
        if self.remaining == 0:
            self.done(self.error)


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

    def _produce(self, topic: str, key: bytes | None, value: bytes, on_delivery) -> None:
        """Queue one message. One that librdkafka refuses at once for its size goes to the
        dead-letter topic instead, cut to a bound and saying why (its delivery report is
        the dead letter's), so that one message cannot hold its batch back for good."""
        try:
            self._produce_waiting(topic, key, value, on_delivery)
        except KafkaException as exc:
            if not _too_large(exc):
                raise
            log.warning("a %d-byte message for %s is too large; dead-lettered", len(value), topic)
            letter = bounded_dead_letter(
                value, f"could not be produced to {topic}: {exc.args[0]}", topic, None, None, key
            )
            self._produce_waiting(self.dlq_topic, None, letter, on_delivery)

    def _produce_waiting(self, topic: str, key: bytes | None, value: bytes, on_delivery) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: serve reports while it drains
                self.producer.poll(0.05)

    def _send(
        self, result: BatchResult, on_delivery, on_unsent: Callable[[int, str], None]
    ) -> None:
        """Queue a batch; if queueing fails, ``on_unsent(messages not queued, why)``."""
        parts = (
            (self.decisions_topic, result.decisions),
            (self.dlq_topic, result.dead_letters),
            (self.features_topic, result.served_features),
        )
        total = sum(len(records) for _, records in parts)
        sent = 0
        try:
            for topic, records in parts:
                for key, value in records:
                    self._produce(topic, key, value, on_delivery)
                    sent += 1
        except Exception as exc:  # KafkaException and anything else: those left are lost
            on_unsent(total - sent, f"producing to {topic} failed: {exc!r}")

    def send(self, result: BatchResult) -> None:
        """Queue a batch's messages (non-blocking); ``wait`` reports their fate."""
        self._send(result, self._on_delivery, lambda _count, error: self._errors.append(error))

    def wait(self, timeout_s: float = 30.0) -> None:
        """Block until everything queued is acknowledged; raise on any failure."""
        remaining = self.producer.flush(timeout_s)
        if remaining:
            raise DeliveryError(f"{remaining} messages not acknowledged within {timeout_s} s")
        if self._errors:
            errors, self._errors = self._errors, []
            raise DeliveryError(f"{len(errors)} messages refused by the broker: {errors[0]}")

    def send_tracked(self, result: BatchResult, done: Callable[[str | None], None]) -> None:
        """Queue a batch and call ``done(None)``, or ``done(first error)``, once the broker
        has answered for every message of it. ``done`` runs inside a later ``poll``
        (``serve``), or at once for a batch with nothing to send."""
        count = len(result.decisions) + len(result.dead_letters) + len(result.served_features)
        if count == 0:
            done(None)
            return
        delivery = _BatchDelivery(count, done)
        self._send(result, delivery.report, delivery.unsent)

    def serve(self) -> None:
        """Run the delivery reports (and ``send_tracked`` callbacks) that have arrived."""
        self.producer.poll(0)

    def close(self, timeout_s: float = 10.0) -> None:
        self.producer.flush(timeout_s)


class AckPipeline:
    """Publishes the worker's batches without waiting, and runs each batch's ``on_safe``
    on the event loop once the broker acknowledged all of its messages.

    The worker decides batch N+1 while batch N's decisions travel; at most
    ``max_in_flight`` batches are unacknowledged at a time. Reports are served on the
    loop: after each submit, and every ``serve_every_s`` by a task of the pipeline. A
    refused message stops the pipeline: ``on_failure`` is called, later ``submit`` calls
    raise ``DeliveryError``, and that batch is never marked safe, so its offsets are
    never committed and it is decided again after a restart.
    """

    def __init__(
        self,
        publisher: Publisher,
        max_in_flight: int = 8,
        on_failure: Callable[[DeliveryError], None] | None = None,
        serve_every_s: float = 0.005,
    ) -> None:
        self.publisher = publisher
        self.max_in_flight = max_in_flight
        self.serve_every_s = serve_every_s
        self.on_failure = on_failure  # runs on the loop at the first refused batch
        self.in_flight = 0
        self.failure: str | None = None
        self._room = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Task | None = None  # held: the loop keeps tasks only weakly

    async def submit(
        self,
        result: BatchResult,
        on_safe: Callable[[], None],
        on_failed: Callable[[str], None] | None = None,
    ) -> None:
        """Queue ``result``; ``on_safe()`` (or ``on_failed(reason)``) runs on this loop later."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._server = self._loop.create_task(self._serve())
        while self.in_flight >= self.max_in_flight and self.failure is None:
            self._room.clear()
            await self._room.wait()
        if self.failure is not None:
            raise DeliveryError(self.failure)
        self.in_flight += 1
        loop = self._loop
        called = False

        def done(error: str | None) -> None:  # inside the producer's poll, on this loop
            nonlocal called
            if called:
                return
            called = True
            if not loop.is_closed():  # a flush after the loop ended settles nothing
                loop.call_soon(self._settle, error, on_safe, on_failed)

        try:
            self.publisher.send_tracked(result, done)
        except Exception as exc:  # not one of its refusals (those settle): free the slot
            if called:
                raise
            called = True  # a report arriving later settles nothing
            reason = f"publishing a batch failed: {exc!r}"
            self._settle(reason, on_safe, on_failed)
            raise DeliveryError(reason) from exc
        if not self._serve_now():
            raise DeliveryError(self.failure)

    async def _serve(self) -> None:
        while self._serve_now():
            await asyncio.sleep(self.serve_every_s)

    def _serve_now(self) -> bool:
        """Serve the reports that are in; False (and the pipeline stopped) if that fails."""
        try:
            self.publisher.serve()
        except Exception as exc:  # a report callback raised: no batch can be confirmed now
            self._fail(f"serving delivery reports failed: {exc!r}")
            return False
        return True

    async def publish(self, result: BatchResult) -> None:
        """Queue ``result`` and wait until the broker acknowledged all of it."""
        settled = asyncio.get_running_loop().create_future()
        await self.submit(
            result,
            lambda: settled.set_result(None),
            lambda reason: settled.set_exception(DeliveryError(reason)),
        )
        await settled

    def _settle(
        self,
        error: str | None,
        on_safe: Callable[[], None],
        on_failed: Callable[[str], None] | None,
    ) -> None:
        self.in_flight -= 1
        try:
            if error is None:
                on_safe()
            else:
                reason = f"the broker refused a message: {error}"
                if on_failed is not None:
                    on_failed(reason)
                self._fail(reason)
        finally:
            self._room.set()  # a submit waiting for room must not wait forever

    def _fail(self, reason: str) -> None:
        """Stop the pipeline: later submits raise, ``on_failure`` runs once."""
        first = self.failure is None
        self.failure = self.failure or reason
        if first and self.on_failure is not None:
            self.on_failure(DeliveryError(reason))
        self._room.set()
