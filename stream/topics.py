"""Reading Kafka topics outside the Faust worker: follow them, or read a range of them.

Two helpers, one per way of reading, so each consumer loop is written once:

- ``TopicTail`` follows topics as messages arrive: from the start or the end of every
  partition by assignment (no consumer group, nothing committed: the monitor, billing,
  the bench's watchers), or as a member of a consumer group that commits what its
  caller says is done (the archive, the plain loop). ``TopicTail.batches`` yields each
  fetch, empty ones included so callers can keep timers, and stops when asked or idle.
- ``TopicScanner`` reads fixed offset ranges per partition and stops at their ends; the
  ranges come from offsets (``offset_ranges``) or event times (``resolve_time_range``),
  and end at most at the high watermark read when they are resolved. Replay uses it.

On the embedded broker (Tansu, FINDINGS.md): a group join takes half the session
timeout, so an idle limit of a group member counts from its assignment; a long poll does
not wake when data arrives, so the waits here are short; the high watermark listed by
the broker can be short of the true end, so ``watermarks`` fetches it.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Self

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from events.errors import SlidrError
from stream.kafka import consumer_config

if TYPE_CHECKING:
    from events.settings import Settings

BEGINNING = "beginning"
END = "end"

Partitions = Callable[[list[TopicPartition]], None]


class TopicError(SlidrError):
    """A topic that cannot be read as asked (missing, or stalled); the message says which."""


def _unique_group(settings: Settings, label: str) -> str:
    # A reader by assignment joins no group and commits nothing; the id only names it.
    return f"{settings.group_id}-{label}-{uuid.uuid4().hex[:12]}"


def topic_partitions(consumer: Consumer, topic: str) -> list[int]:
    """The partitions of ``topic`` (full name), none when the broker does not know it."""
    try:
        found = consumer.list_topics(topic, timeout=10).topics.get(topic)
    except KafkaException as exc:  # the broker did not answer: a user's setup, not a bug
        raise TopicError(
            f"{topic}: no metadata from the broker ({exc.args[0].str()}): run `slidr up`, "
            "or check SLIDR_KAFKA_BOOTSTRAP"
        ) from None
    if found is None or found.error is not None:
        return []
    return sorted(found.partitions)


def position(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a message a consumer returned without an error.

    librdkafka sets all three on such a message; the stubs type them Optional because an
    error event or a ``Message`` built by hand may lack them.
    """
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError(f"not a consumed message: {topic}[{partition}]@{offset}")
    return topic, partition, offset


def arrived_now(consumer: Consumer, wait_s: float, most: int = 1000) -> list[Message]:
    """Messages already fetched, waiting up to ``wait_s`` for the first one only.

    ``Consumer.consume(n, timeout)`` returns when it has ``n`` messages or when the
    timeout ends, so a reader timing arrivals with ``consume(1000, 0.05)`` adds up to
    50 ms to every message it sees. Measured, bare produce -> consume on a fresh Tansu,
    2,000 msg/s for 10 s, linger 10 ms, fetch wait 20 ms, two runs each: read that way
    p50 38 ms / p99 68-69 ms; read this way p50 13 ms / p99 23-24 ms.
    """
    first = consumer.poll(wait_s)
    if first is None:
        return []
    return [first, *consumer.consume(most - 1, 0)]


class _ClosesConsumer:
    """Closes its ``consumer`` on ``close`` and at the end of a ``with`` block."""

    consumer: Consumer

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def watermarks(
    consumer: Consumer, topic: str, partition: int, stall_s: float = 20.0
) -> tuple[int, int]:
    """(low, high) offsets of a partition (``topic`` a full name): [low, high) holds its
    messages. Leaves ``consumer`` with nothing assigned.

    Tansu 0.6 answers ListOffsets(latest) with the *first* offset of the last record
    batch plus one, not the end of that batch (measured: 3 batches of 10 records ->
    21, not 30); the high watermark in a fetch response is right. So fetch from the
    listed end minus one and take the fetch's watermark (one cheap fetch on Kafka).
    """
    tp = TopicPartition(topic, partition)
    low, listed = consumer.get_watermark_offsets(tp, timeout=10, cached=False)
    if listed <= low:
        return low, listed
    consumer.assign([TopicPartition(topic, partition, listed - 1)])
    try:
        deadline = time.monotonic() + stall_s
        while time.monotonic() < deadline:
            messages = consumer.consume(1, 0.1)
            if any(m.error() is None for m in messages):
                break
        else:
            raise TopicError(f"{topic}[{partition}]: offset {listed - 1} could not be fetched")
        _, high = consumer.get_watermark_offsets(tp, cached=True)
    finally:
        consumer.unassign()
    return low, max(listed, high)


# -- following topics ----------------------------------------------------------------------


class TopicTail(_ClosesConsumer):
    """Follows topics (logical names, ``settings.topic`` adds the prefix).

    Without ``group_id``: every partition is assigned at once, at ``start`` (``END``: the
    end now, as ``watermarks`` finds it; ``BEGINNING``: offset 0), outside any consumer
    group; nothing is committed. With ``group_id``: the topics are subscribed in that group,
    the broker assigns partitions (``on_assign``/``on_revoke`` are told), reading resumes
    from the group's committed offsets (earliest for a new group), and offsets are
    committed only by ``commit``.

    Each fetch takes up to ``batch`` messages, waiting up to ``wait_s`` to fill it; with
    ``as_arrived`` it returns as soon as one message is there (``arrived_now``), for
    timing arrivals. Use it as a context manager, or call ``close``.
    """

    def __init__(
        self,
        settings: Settings,
        topics: Sequence[str],
        *,
        group_id: str | None = None,
        start: str = END,
        label: str = "tail",
        batch: int = 1000,
        wait_s: float = 0.2,
        as_arrived: bool = False,
        on_assign: Partitions | None = None,
        on_revoke: Partitions | None = None,
    ) -> None:
        if start not in (BEGINNING, END):
            raise ValueError(f"start must be {BEGINNING!r} or {END!r}, got {start!r}")
        self.topics = [settings.topic(name) for name in topics]
        self.batch = batch
        self.wait_s = wait_s
        self.as_arrived = as_arrived
        self.assigned_at: float | None = None  # monotonic time of the latest assignment
        self.consumer = Consumer(
            consumer_config(settings, group_id or _unique_group(settings, label))
        )
        if group_id is not None:

            def assigned(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
                self.assigned_at = time.monotonic()
                if on_assign is not None:
                    on_assign(partitions)

            def revoked(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
                if on_revoke is not None:
                    on_revoke(partitions)

            self.consumer.subscribe(self.topics, on_assign=assigned, on_revoke=revoked)
            return
        assignment = []
        try:
            for topic in self.topics:
                for p in topic_partitions(self.consumer, topic):
                    offset = watermarks(self.consumer, topic, p)[1] if start == END else 0
                    assignment.append(TopicPartition(topic, p, offset))
            self.consumer.assign(assignment)
        except BaseException:
            self.consumer.close()
            raise
        self.assigned_at = time.monotonic()

    def fetch(self) -> list[Message]:
        """One fetch: the messages that came, error events left out (may be empty)."""
        if self.as_arrived:
            fetched = arrived_now(self.consumer, self.wait_s, self.batch)
        else:
            fetched = self.consumer.consume(self.batch, self.wait_s)
        return [m for m in fetched if m.error() is None]

    def batches(
        self,
        idle_s: float | None = None,
        stop: threading.Event | None = None,
        startup_timeout_s: float = 60.0,
    ) -> Iterator[list[Message]]:
        """Each fetch's messages, until ``stop`` is set or ``idle_s`` seconds pass without a
        message (counted from the latest assignment at the earliest). A group member that
        gets no partitions within ``max(startup_timeout_s, idle_s)`` stops too.
        """
        started = last_message = time.monotonic()
        while stop is None or not stop.is_set():
            messages = self.fetch()
            now = time.monotonic()
            if messages:
                last_message = now
            yield messages
            if idle_s is None:
                continue
            if self.assigned_at is None:
                if now - started > max(startup_timeout_s, idle_s):
                    return
            elif now - max(last_message, self.assigned_at) >= idle_s:
                return

    def commit(self, offsets: Mapping[tuple[str, int], int] | None = None) -> None:
        """Commit, and wait for it: ``offsets`` maps (topic, partition) to the next offset
        to read; without it, everything fetched so far. Raises ``KafkaException``."""
        if offsets is None:
            self.consumer.commit(asynchronous=False)
        else:
            self.consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )


# -- reading ranges ------------------------------------------------------------------------


@dataclass(frozen=True)
class OffsetRange:
    """Offsets [start, end) of one partition."""

    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


def first_offset_at_or_after(
    probe: Callable[[int, int], tuple[int, float]],
    lo: int,
    hi: int,
    t: float,
    scan: Callable[[int, int], Iterable[tuple[int, float | None]]] | None = None,
    linear_span: int = 0,
) -> int:
    """Smallest offset in [lo, hi] whose first valid event (at or after it) has ``ts >= t``.

    ``probe(offset, hi)`` returns (offset of the first valid event at or after ``offset``,
    its ts), or (hi, inf) when there is none before ``hi``. Binary search, exact for a
    partition in event-time order: about log2(hi - lo) probes. With ``scan(lo, hi)``
    (every (offset, ts or None for an invalid event) of [lo, hi), in order), the last
    ``linear_span`` offsets are read in one go instead: one read beats many probes there.
    """
    while hi - lo > linear_span or (scan is None and lo < hi):
        mid = (lo + hi) // 2
        found, ts = probe(mid, hi)
        if ts >= t:
            hi = mid
        else:  # every offset in [mid, found] leads to this event, which is too early
            lo = found + 1
    if scan is None or lo >= hi:
        return lo
    answer = lo
    for offset, event_ts in scan(lo, hi):
        if event_ts is None:
            continue
        if event_ts >= t:
            return answer
        answer = offset + 1
    return answer


class TopicScanner(_ClosesConsumer):
    """Reads offset ranges of one topic by assignment: no consumer group, no commits.

    ``event_time(value)`` gives a message's event time in epoch seconds (None for an
    invalid event); event-time bounds (``offset_for_time``) need it.
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        event_time: Callable[[bytes | None], float | None] | None = None,
        stall_s: float = 20.0,
        linear_span: int = 2000,
    ) -> None:
        self.topic = settings.topic(topic)
        self.event_time = event_time
        self.stall_s = stall_s
        self.linear_span = linear_span  # bisect down to this many offsets, then read them
        self.consumer = Consumer(
            consumer_config(
                settings, group_id=_unique_group(settings, "scan"), enable_partition_eof=False
            )
        )
        self.partitions = topic_partitions(self.consumer, self.topic)
        if not self.partitions:
            self.consumer.close()
            raise TopicError(
                f"topic {self.topic} does not exist (run `slidr up`, or check SLIDR_TOPIC_PREFIX)"
            )
        self.probes = 0

    def watermarks(self, partition: int) -> tuple[int, int]:
        """(low, high) offsets of a partition now: [low, high) holds its messages."""
        return watermarks(self.consumer, self.topic, partition, self.stall_s)

    def whole(self) -> list[OffsetRange]:
        """Every partition from its low to its high watermark, as they are now."""
        return [OffsetRange(p, *self.watermarks(p)) for p in self.partitions]

    def read(self, ranges: list[OffsetRange], batch: int = 1000) -> Generator[Message, None, None]:
        """Every message in the ranges (each partition in offset order), then stop."""
        todo = {r.partition: r for r in ranges if r.size}
        if not todo:
            return
        self.consumer.assign(
            [TopicPartition(self.topic, r.partition, r.start) for r in todo.values()]
        )
        last = time.monotonic()
        try:
            while todo:
                messages = self.consumer.consume(batch, 0.1)
                now = time.monotonic()
                for msg in messages:
                    if msg.error() is not None:
                        continue
                    _, partition, offset = position(msg)
                    r = todo.get(partition)
                    if r is None or offset < r.start:
                        continue
                    last = now
                    if offset >= r.end:
                        del todo[r.partition]
                        continue
                    yield msg
                    if offset + 1 >= r.end:
                        del todo[r.partition]
                if not messages and todo:
                    # The range may end with offsets that are never delivered (control
                    # records, compacted gaps): the position says when we are past them.
                    for tp in self.consumer.position([TopicPartition(self.topic, p) for p in todo]):
                        if tp.offset >= 0 and tp.offset >= todo[tp.partition].end:
                            del todo[tp.partition]
                    if todo and now - last > self.stall_s:
                        raise TopicError(
                            f"{self.topic}: no messages for {self.stall_s:g} s while reading "
                            f"{sorted((r.partition, r.start, r.end) for r in todo.values())}"
                        )
        finally:
            self.consumer.unassign()

    def _time_of(self, msg: Message) -> float | None:
        if self.event_time is None:
            raise TypeError("TopicScanner needs event_time to resolve event-time bounds")
        return self.event_time(msg.value())

    def first_event(self, partition: int, offset: int, end: int) -> tuple[int, float]:
        """(offset, ts) of the first valid event at or after ``offset``; (end, inf) if none."""
        self.probes += 1
        with contextlib.closing(self.read([OffsetRange(partition, offset, end)])) as messages:
            for msg in messages:
                ts = self._time_of(msg)
                if ts is not None:
                    return position(msg)[2], ts
        return end, math.inf

    def offset_for_time(self, partition: int, t: float, lo: int, hi: int) -> int:
        """First offset in [lo, hi] at which events reach event time ``t`` (bisection)."""

        def scan(start: int, end: int) -> Iterator[tuple[int, float | None]]:
            self.probes += 1
            for msg in self.read([OffsetRange(partition, start, end)]):
                yield position(msg)[2], self._time_of(msg)

        return first_offset_at_or_after(
            lambda offset, end: self.first_event(partition, offset, end),
            lo,
            hi,
            t,
            scan=scan,
            linear_span=self.linear_span,
        )


def scan_topic(settings: Settings, topic: str) -> Iterator[Message]:
    """Every message of ``topic`` up to the high watermarks at the start, then stop."""
    with TopicScanner(settings, topic) as scanner:
        yield from scanner.read(scanner.whole())


def resolve_time_range(
    scanner: TopicScanner,
    since: float | None,
    until: float | None,
    max_disorder_s: float,
    partitions: list[int] | None = None,
    full_scan: bool = False,
) -> list[OffsetRange]:
    """Per partition, offsets that hold every event with ``since <= ts < until``.

    The ranges are widened by ``max_disorder_s`` on both sides (events up to that far
    from their time-ordered place are still found); filter by ``ts`` when reading them.
    ``full_scan`` takes every partition whole instead of bisecting.
    """
    out = []
    for p in partitions if partitions is not None else scanner.partitions:
        low, high = scanner.watermarks(p)
        start, end = low, high
        if not full_scan:
            if since is not None:
                start = scanner.offset_for_time(p, since - max_disorder_s, low, high)
            if until is not None:
                end = scanner.offset_for_time(p, until + max_disorder_s, start, high)
        out.append(OffsetRange(p, start, end))
    return out


def offset_ranges(
    scanner: TopicScanner,
    from_offset: int | dict[int, int] | None,
    to_offset: int | dict[int, int] | None,
    partitions: list[int] | None = None,
) -> list[OffsetRange]:
    """Offset ranges from offsets (clipped to the watermarks).

    A dict names partitions; a partition missing from a dict starts at the low
    watermark (``from``) or ends at the high one (``to``). With dicts only and no
    ``partitions``, only the partitions the dicts name are read.
    """
    if partitions is None:
        named = set()
        for value in (from_offset, to_offset):
            if isinstance(value, dict):
                named |= set(value)
        partitions = (
            sorted(named)
            if named and not any(isinstance(v, int) for v in (from_offset, to_offset))
            else scanner.partitions
        )
    unknown = sorted(set(partitions) - set(scanner.partitions))
    if unknown:
        raise TopicError(
            f"{scanner.topic} has no partition(s) {unknown} (it has {scanner.partitions})"
        )
    out = []
    for p in partitions:
        low, high = scanner.watermarks(p)
        start = (
            from_offset.get(p, low)
            if isinstance(from_offset, dict)
            else (low if from_offset is None else from_offset)
        )
        end = (
            to_offset.get(p, high)
            if isinstance(to_offset, dict)
            else (high if to_offset is None else to_offset)
        )
        out.append(OffsetRange(p, min(max(start, low), high), min(max(end, low), high)))
    return out
