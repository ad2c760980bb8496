"""Reading topics: following them (``TopicTail``) and reading ranges (``TopicScanner``),
against the embedded broker; the bisection on event time without one."""

from __future__ import annotations

import threading
import time

import orjson
import pytest
from confluent_kafka import Producer

from events.settings import Settings
from stream.kafka import CLICKS, DECISIONS, producer_config
from stream.topics import (
    BEGINNING,
    END,
    OffsetRange,
    TopicError,
    TopicScanner,
    TopicTail,
    first_offset_at_or_after,
    offset_ranges,
    resolve_time_range,
    scan_topic,
)


def produce(
    settings: Settings, topic: str, values: list[bytes], partition: int = 0, batch: int = 0
) -> None:
    """``values`` to one partition in order; with ``batch``, flushed every ``batch`` records
    so each group is a record batch of its own."""
    producer = Producer(producer_config(settings))
    for i, value in enumerate(values):
        producer.produce(settings.topic(topic), value=value, key=value, partition=partition)
        if batch and (i + 1) % batch == 0:
            assert producer.flush(30) == 0
    assert producer.flush(30) == 0


def values(prefix: str, n: int) -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


def read_until(tail: TopicTail, count: int, timeout_s: float = 30.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    for messages in tail.batches():
        got.extend(m.value() for m in messages)
        if len(got) >= count or time.monotonic() > deadline:
            break
    return got


# -- without a broker -----------------------------------------------------------------------


@pytest.mark.parametrize("linear_span", [0, 4, 1000])
def test_bisection_finds_the_first_offset_at_or_after_a_time(linear_span: int) -> None:
    # Event times by offset; None is a malformed event (no time).
    ts = [None, 1.0, 2.0, None, None, 2.0, 5.0, None, 7.0, 9.0, None, 9.5, 12.0, None]
    probes = []

    def probe(offset: int, end: int) -> tuple[int, float]:
        probes.append(offset)
        for o in range(offset, end):
            if ts[o] is not None:
                return o, ts[o]
        return end, float("inf")

    def scan(lo: int, hi: int):
        return [(o, ts[o]) for o in range(lo, hi)]

    def expected(t: float) -> int:  # brute force: smallest o whose next valid click has ts >= t
        for o in range(len(ts) + 1):
            following = [x for x in ts[o:] if x is not None]
            if not following or following[0] >= t:
                return o
        raise AssertionError

    for t in (-1, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 6.0, 9.0, 9.2, 12.0, 13.0):
        got = first_offset_at_or_after(probe, 0, len(ts), t, scan, linear_span)
        assert got == expected(t), t
    assert first_offset_at_or_after(probe, 5, 5, 3.0) == 5


# -- following a topic ----------------------------------------------------------------------


def test_a_tail_from_the_end_sees_only_new_messages(stream_settings: Settings) -> None:
    produce(stream_settings, DECISIONS, values("old", 5))
    with TopicTail(stream_settings, [DECISIONS], start=END, wait_s=0.05) as tail:
        produce(stream_settings, DECISIONS, values("new", 5), partition=1)
        assert sorted(read_until(tail, 5)) == sorted(values("new", 5))


def test_a_tail_from_the_beginning_stops_when_idle(stream_settings: Settings) -> None:
    produce(stream_settings, DECISIONS, values("a", 7), partition=2)
    produce(stream_settings, DECISIONS, values("b", 3), partition=3)
    for as_arrived in (False, True):
        got: list[bytes] = []
        started = time.monotonic()
        with TopicTail(
            stream_settings, [DECISIONS], start=BEGINNING, wait_s=0.05, as_arrived=as_arrived
        ) as tail:
            for messages in tail.batches(idle_s=1.0):
                got.extend(m.value() for m in messages)
        assert sorted(got) == sorted(values("a", 7) + values("b", 3)), as_arrived
        assert time.monotonic() - started < 20


def test_a_tail_stops_when_told(stream_settings: Settings) -> None:
    stop = threading.Event()
    fetches = 0
    with TopicTail(stream_settings, [DECISIONS], start=END, wait_s=0.05) as tail:
        for _ in tail.batches(stop=stop):
            fetches += 1
            if fetches == 3:
                stop.set()
    assert fetches == 3


def test_a_group_member_resumes_from_what_it_committed(stream_settings: Settings) -> None:
    settings = stream_settings.replace(session_timeout_ms=2000)  # joins take ~1 s on Tansu
    group = f"{settings.topic_prefix}group"
    produce(settings, CLICKS, values("c", 10))
    assigned: list[int] = []
    with TopicTail(
        settings,
        [CLICKS],
        group_id=group,
        wait_s=0.05,
        on_assign=lambda partitions: assigned.append(len(partitions)),
    ) as tail:
        first: list[bytes] = []
        for messages in tail.batches(idle_s=2.0):
            for msg in messages:
                first.append(msg.value())
                if len(first) == 4:  # what is done: the first four
                    tail.commit({(msg.topic(), msg.partition()): msg.offset() + 1})
    assert first == values("c", 10)
    assert assigned and assigned[0] == settings.partitions
    with TopicTail(settings, [CLICKS], group_id=group, wait_s=0.05) as tail:
        again = [m.value() for messages in tail.batches(idle_s=2.0) for m in messages]
        assert again == values("c", 10)[4:]
        tail.commit()  # everything fetched
    with TopicTail(settings, [CLICKS], group_id=group, wait_s=0.05) as tail:
        assert [m for messages in tail.batches(idle_s=1.0) for m in messages] == []
        assert tail.assigned_at is not None


def test_a_group_member_without_partitions_gives_up(stream_settings: Settings) -> None:
    settings = stream_settings.replace(session_timeout_ms=2000)
    with TopicTail(settings, [CLICKS], group_id=f"{settings.topic_prefix}g", wait_s=0.05) as tail:
        # Too short to be assigned: the startup limit ends the loop.
        batches = list(tail.batches(idle_s=0.1, startup_timeout_s=0.0))
    assert tail.assigned_at is None and all(b == [] for b in batches)


# -- reading a range ------------------------------------------------------------------------


def test_watermarks_reach_the_true_end_of_the_last_batch(stream_settings: Settings) -> None:
    # Tansu lists the end of a partition as its last batch's first offset + 1 (21 here).
    produce(stream_settings, CLICKS, values("x", 30), partition=0, batch=10)
    with TopicScanner(stream_settings, CLICKS) as scanner:
        assert scanner.partitions == list(range(stream_settings.partitions))
        assert scanner.watermarks(0) == (0, 30)
        assert scanner.watermarks(1) == (0, 0)
        assert [(r.partition, r.start, r.end) for r in scanner.whole()] == [
            (0, 0, 30),
            (1, 0, 0),
            (2, 0, 0),
            (3, 0, 0),
        ]
        got = [(m.offset(), m.value()) for m in scanner.read([OffsetRange(0, 12, 25)])]
        assert got == [(o, f"x-{o}".encode()) for o in range(12, 25)]
        ranges = offset_ranges(scanner, {0: 5}, {0: 500})
        assert [(r.partition, r.start, r.end) for r in ranges] == [(0, 5, 30)]
        with pytest.raises(TopicError, match="no partition"):
            offset_ranges(scanner, {9: 0}, None)
    # A scan ends at the end it found when it started.
    read = []
    for msg in scan_topic(stream_settings, CLICKS):
        read.append(msg.value())
        if len(read) == 1:
            produce(stream_settings, CLICKS, values("later", 3), partition=0)
    assert read == values("x", 30)


def test_event_time_bounds_by_bisection(stream_settings: Settings) -> None:
    # Events in time order per partition, with invalid ones between them.
    events = []
    for i in range(400):
        events.append(orjson.dumps({"ts": 1000.0 + i}))
        if i % 50 == 7:
            events.append(b"not json")
    produce(stream_settings, CLICKS, events, partition=0, batch=100)

    def event_time(value: bytes | None) -> float | None:
        try:
            return float(orjson.loads(value or b"")["ts"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None

    with TopicScanner(stream_settings, CLICKS, event_time=event_time, linear_span=16) as s:
        ranges = resolve_time_range(s, 1100.0, 1200.0, max_disorder_s=0.0, partitions=[0])
        (r,) = ranges
        times = [event_time(m.value()) for m in s.read(ranges)]
        valid = [t for t in times if t is not None]
        assert valid == [1000.0 + i for i in range(100, 200)]
        assert r.size < 110 and s.probes < 20
        full = resolve_time_range(s, 1100.0, 1200.0, 0.0, partitions=[0], full_scan=True)
        assert [(f.start, f.end) for f in full] == [(0, len(events))]


def test_a_missing_topic_is_a_topic_error(stream_settings: Settings) -> None:
    with pytest.raises(TopicError, match="does not exist"):
        TopicScanner(stream_settings, "no-such-topic")
