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
import time
from collections import deque
from collections.abc import Callable

from confluent_kafka import KafkaError, KafkaException, Producer

from events.errors import SlidrError
from events.settings import Settings
from stream.engine import BatchResult, bounded_dead_letter
from stream.kafka import (
    CLICKS_DLQ,
    DECISIONS,
    FEATURES_SERVED,
    producer_config,
    state_changelog,
)

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
        self.changelog_topic = settings.topic(state_changelog(settings.group_id))
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
        """Queue a batch's decisions, dead letters and served features (not its state
        records: ``send_state``); if queueing fails, ``on_unsent(messages not queued, why)``."""
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

    def send_state(self, result: BatchResult, done: Callable[[str | None], None]) -> None:
        """Queue the batch's state records (``result.changelog``), each to the changelog
        partition of its click's partition, and call ``done(None)`` (or ``done(first
        error)``) once the broker has answered for all of them, inside a later ``poll``.
        ``result.changelog_offsets`` then holds the highest offset given per partition."""
        delivery = _BatchDelivery(len(result.changelog), done)
        offsets = result.changelog_offsets

        def logged(err, msg) -> None:
            if err is None:
                partition, offset = msg.partition(), msg.offset()
                if offset > offsets.get(partition, -1):
                    offsets[partition] = offset
            delivery.report(err, msg)

        topic = self.changelog_topic
        produce, poll = self.producer.produce, self.producer.poll
        sent = 0
        try:
            for partition, key, state in result.changelog:
                while True:
                    try:
                        produce(topic, state, key, partition=partition, on_delivery=logged)
                        break
                    except BufferError:  # local queue full: serve reports as it drains
                        poll(0.05)
                sent += 1
        except Exception as exc:  # those left are lost: the batch is refused
            delivery.unsent(len(result.changelog) - sent, f"producing to {topic} failed: {exc!r}")

    def _state_sent(self, error: str | None) -> None:
        if error is not None:
            self._errors.append(error)

    def send(self, result: BatchResult) -> None:
        """Queue a batch's messages (non-blocking); ``wait`` reports their fate."""
        if result.changelog:
            self.send_state(result, self._state_sent)
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
        """Queue a batch's decisions, dead letters and served features and call
        ``done(None)``, or ``done(first error)``, once the broker has answered for every
        one of them. ``done`` runs inside a later ``poll`` (``serve``), or at once for a
        batch with nothing to send. State records are ``send_state``'s."""
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


class _Submitted:
    """One batch of an ``AckPipeline``, from its submission until it is released."""

    __slots__ = ("on_safe", "on_failed", "settled", "error")

    def __init__(
        self, on_safe: Callable[[], None], on_failed: Callable[[str], None] | None
    ) -> None:
        self.on_safe = on_safe
        self.on_failed = on_failed
        self.settled = False  # the broker answered for all of it (or it was never queued)
        self.error: str | None = None


class AckPipeline:
    """Publishes the worker's batches without waiting, and runs each batch's ``on_safe``
    on the event loop once the broker acknowledged all of its messages *and* those of
    every batch submitted before it.

    The worker decides batch N+1 while batch N's decisions travel; at most
    ``max_in_flight`` batches are unreleased at a time. Delivery reports complete in any
    order (decisions of different batches go to different partitions of the broker), so
    batches are released strictly in submission order: batch N+1, acknowledged first,
    waits for N. Batches of a partition are submitted in offset order, so its offsets
    become committable in offset order, whatever the consumer's own gap checks do
    (faust-streaming 0.15.3 skips its check while a partition has no committed offset).

    Reports are served on the loop: after each submit, and every ``serve_every_s`` by a
    task of the pipeline. A refused message stops the pipeline: ``on_failure`` is called
    at once, later ``submit`` calls raise ``DeliveryError``, and that batch and every
    batch submitted after it get ``on_failed`` instead of ``on_safe``, so their offsets
    are never committed and they are decided again after a restart. Batches submitted
    before it are still released as safe once acknowledged.
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
        self.failure: str | None = None
        self._submitted: deque[_Submitted] = deque()  # unreleased, in submission order
        self._refused = False  # a released batch was refused: later ones are not safe
        self._room = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Task | None = None  # held: the loop keeps tasks only weakly

    @property
    def in_flight(self) -> int:
        """Batches submitted and not yet released (each holds a slot)."""
        return len(self._submitted)

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
        batch = _Submitted(on_safe, on_failed)
        self._submitted.append(batch)  # the slot: held until the batch is released
        loop = self._loop
        called = False

        def done(error: str | None) -> None:  # inside the producer's poll, on this loop
            nonlocal called
            if called:
                return
            called = True
            if not loop.is_closed():  # a flush after the loop ended settles nothing
                reason = None if error is None else f"the broker refused a message: {error}"
                loop.call_soon(self._settle, batch, reason)

        def publish_after_state() -> None:
            nonlocal called
            try:
                self.publisher.send_tracked(result, done)
            except Exception as exc:  # as below: free the slot
                if not called:
                    called = True
                    self._settle(batch, f"publishing a batch failed: {exc!r}")

        def logged(error: str | None) -> None:  # inside the producer's poll, on this loop
            if error is not None:
                done(error)
            elif not loop.is_closed():
                loop.call_soon(publish_after_state)

        try:
            if result.changelog:
                # The state first, the decisions once the broker has it: a decision that
                # can be read is one whose state a restore finds (stream.changelog).
                self.publisher.send_state(result, logged)
            else:
                self.publisher.send_tracked(result, done)
        except Exception as exc:  # not one of its refusals (those settle): free the slot
            if called:
                raise
            called = True  # a report arriving later settles nothing
            reason = f"publishing a batch failed: {exc!r}"
            self._settle(batch, reason)
            raise DeliveryError(reason) from exc
        if not self._serve_now():
            assert self.failure is not None  # _serve_now stopped the pipeline with a reason
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

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted batch is released (or the pipeline stopped);
        False if some are still in flight after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while self._submitted and self.failure is None:
            if time.monotonic() >= deadline:
                return False
            self._serve_now()
            await asyncio.sleep(self.serve_every_s)
        return True

    async def publish(self, result: BatchResult) -> None:
        """Queue ``result`` and wait until the broker acknowledged all of it (and every
        batch submitted before it)."""
        settled = asyncio.get_running_loop().create_future()
        await self.submit(
            result,
            lambda: settled.set_result(None),
            lambda reason: settled.set_exception(DeliveryError(reason)),
        )
        await settled

    def _settle(self, batch: _Submitted, error: str | None) -> None:
        """The broker answered for ``batch``: stop at once on a refusal, then release
        every settled batch at the head of the submission order."""
        batch.settled = True
        if error is not None:
            batch.error = error
            self._fail(error)
        try:
            self._release()
        finally:
            self._room.set()  # a submit waiting for room must not wait forever

    def _release(self) -> None:
        submitted = self._submitted
        while submitted and submitted[0].settled:
            batch = submitted.popleft()
            if batch.error is not None:
                self._refused = True
            try:
                if batch.error is None and not self._refused:
                    batch.on_safe()
                elif batch.on_failed is not None:
                    batch.on_failed(batch.error or f"an earlier batch was refused: {self.failure}")
            except Exception:  # one callback's bug must not keep later batches unreleased
                log.exception("a batch's release callback failed")

    def _fail(self, reason: str) -> None:
        """Stop the pipeline: later submits raise, ``on_failure`` runs once."""
        first = self.failure is None
        self.failure = self.failure or reason
        if first and self.on_failure is not None:
            self.on_failure(DeliveryError(reason))
        self._room.set()
