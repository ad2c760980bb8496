"""A bounded soak test (issue 12): about a minute and a half of compressed hostile traffic
through real worker processes on the embedded stack, with two rebalances (a second
worker joins, then leaves), in which every click is decided, every partition is
committed to its end, and state and memory stay flat.

The traffic repeats its users and IPs (so a steady state exists) and holds the kinds of
click that used to grow state: a user rotating IPs and sessions, an IP behind ever new
sessions of hundreds of users, unique long user agents and wide contexts. Event time
runs 60 times faster than the wall clock (a minute of event time a second), so windows
of seconds and minutes turn over, and user state expires by event time many times.

Flat means: a late window (the first worker alone again, after both rebalances) against
an early one (the first worker alone, warmed up), within a tolerance:

- RocksDB: entity records (one per user seen, ``e:`` keys), their bytes, and the
  largest record (the rotating user's, which held every IP and session it ever sent
  before the distinct sets had a bound);
- Redis: bytes per key (``used_memory`` over the run's keys) and the largest distinct
  set (never more than ``MAX_DISTINCT_MEMBERS``). The run's key count is logged, not
  compared: Redis keys expire on the wall clock (two windows plus the allowed lateness,
  in seconds), which compressed time does not reach, so new buckets add keys throughout;
- the first worker's resident memory (``/proc``, its process and any children).

Stored decisions (``c:`` keys, kept for the day after their click's day for duplicate
detection) grow with the clicks by design and are logged. Nothing here times anything:
the deadlines only stop a broken run from hanging the suite.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import cast

from rocksdict import AccessType, Options, Rdict

from features.limits import MAX_DISTINCT_MEMBERS
from stream.bench_adversarial import redis_state
from stream.kafka import CLICKS
from stream.local_stack import free_port
from tests.stream.test_worker import DECIDE_S, JOIN_S, committed_offsets, wait_joined
from tests.stream.worker_harness import (
    DecisionReader,
    PacedProducer,
    PrivateRedis,
    TopicReader,
    click_record,
    unique,
    wait_until,
)

RATE = 400  # clicks/s produced
CLICKS_PER_PHASE = 10_000  # three phases: alone, with a second worker, alone again
EVENT_SPEED = 60.0  # event seconds per wall second
AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0 Safari/537.36"
)


def soak_clicks(n: int, seed: int = 7) -> list[dict]:
    """``n`` clicks in event-time order, ``EVENT_SPEED / RATE`` event seconds apart,
    ending an hour before now (no click may be stamped ahead of the worker's clock)."""
    rng = random.Random(seed)
    step = EVENT_SPEED / RATE
    start = time.time() - n * step - 3600.0
    clicks = []
    for i in range(n):
        user = rng.randrange(400)
        click: dict = {
            "click_id": f"soak-{i}",
            "ts": start + i * step,
            "user_id": f"user-{user}",
            "ip": f"192.0.2.{user % 100}",  # a user's home IP, shared with three others
            "user_agent": AGENT,
            "ad_id": f"ad-{rng.randrange(40)}",
            "context": {"publisher": f"p{rng.randrange(8)}", "app": f"{rng.randrange(5)}"},
        }
        kind = i % 20
        if kind < 2:  # one user, a new session and one of thousands of IPs each click
            click.update(
                user_id="rotator",
                session_id=f"rot-{i}" if i % 3 else f"rot-{i}-" + "s" * 100,
                ip=f"10.{rng.randrange(20)}.{rng.randrange(250)}.1",
            )
        elif kind < 4:  # one IP, hundreds of users, a new session each click
            click.update(ip="198.51.100.7", user_id=f"nat-{rng.randrange(300)}")
            click["session_id"] = f"nat-{i}"
        elif kind == 4 and i % 40 == 4:  # a user agent never seen before, up to 2 KB
            length = rng.randrange(200, 2048)
            click["user_agent"] = (f"Mozilla/5.0 (X11; Linux) Chrome/124.0.{i} " + "z" * length)[
                :length
            ]
        elif kind == 5:  # a wide context of new keys and values
            click["context"] = {f"k{j}-{i % 97}": f"v{i}-{j}" * 3 for j in range(20)}
        clicks.append(click)
    return clicks


@dataclass
class Sample:
    """One look at the state and memory, at ``sent`` clicks produced."""

    sent: int
    second_worker: bool
    rss_mib: float
    records: int
    record_bytes: int
    largest_record: int
    decisions: int
    redis_keys: int
    redis_used: int
    largest_set: int

    @property
    def bytes_per_record(self) -> float:
        return self.record_bytes / max(self.records, 1)


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and every process under it (``slidr worker`` may run
    its work in children), from ``/proc``."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    total_kib = 0
    for member in tree:
        try:
            with open(f"/proc/{member}/status") as status:
                total_kib += next(
                    (int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0
                )
        except OSError:
            continue
    return total_kib / 1024


def rocksdb_figures(state_root: Path) -> tuple[int, int, int, int]:
    """(entity records, their bytes, the largest, stored decisions) over every partition
    directory, read through read-only opens beside the workers that write them."""
    records = record_bytes = largest = decisions = 0
    for directory in sorted(state_root.glob("p*")):
        for attempt in range(5):
            try:
                db = Rdict(
                    str(directory), Options(raw_mode=True), access_type=AccessType.read_only()
                )
                break
            except Exception:  # a compaction removed a file being opened: try again
                if attempt == 4:
                    raise
                time.sleep(0.2)
        try:
            for key, value in cast("Iterator[tuple[bytes, bytes]]", db.items()):
                if key.startswith(b"e:"):
                    records += 1
                    record_bytes += len(value)
                    largest = max(largest, len(value))
                elif key.startswith(b"c:"):
                    decisions += 1
        finally:
            db.close()
    return records, record_bytes, largest, decisions


def _window(samples: list[Sample], low: int, high: int, second: bool) -> list[Sample]:
    return [s for s in samples if low <= s.sent <= high and s.second_worker is second]


def test_soak_with_rebalances_keeps_state_and_memory_flat(
    worker_settings, workers, tmp_path
) -> None:
    group, home = unique("g"), tmp_path / "shared-home"
    # A Valkey of its own, so that used_memory is this run's alone.
    redis_server = PrivateRedis(tmp_path / "redis", free_port())
    redis_server.start()
    settings = worker_settings.replace(redis_url=redis_server.url)
    first = workers.new("first", group, home=home, settings=settings)
    second = workers.new("second", group, home=home, settings=settings)
    clicks = soak_clicks(3 * CLICKS_PER_PHASE)
    producer = PacedProducer(settings, [click_record(c) for c in clicks], rate=RATE, burst=20)
    reader = DecisionReader(settings)
    state_root = home / "state" / group
    prefix = settings.redis_key_prefix + settings.topic_prefix
    samples: list[Sample] = []

    redis_empty = redis_state(settings.redis_url, prefix)["used_memory"]  # with no key

    def redis_bytes_per_key(s: Sample) -> float:
        return (s.redis_used - redis_empty) / max(s.redis_keys, 1)

    def sample() -> None:
        records, record_bytes, largest, decisions = rocksdb_figures(state_root)
        redis = redis_state(settings.redis_url, prefix)
        keys, used, largest_set = redis["keys"], redis["used_memory"], redis["largest_set"]
        samples.append(
            Sample(
                producer.sent,
                second.running,
                rss_mib(first.pid),
                records,
                record_bytes,
                largest,
                decisions,
                keys,
                used,
                largest_set,
            )
        )

    try:
        first.start()
        wait_joined(first)
        producer.start()
        joined = left = False
        while producer.is_alive():
            if not joined and producer.sent >= CLICKS_PER_PHASE:
                second.start()  # rebalance 1: the partitions split between two workers
                joined = True
            if joined and not left and producer.sent >= 2 * CLICKS_PER_PHASE:
                assert wait_until(lambda: second.assignment() is not None, JOIN_S), (
                    f"the second worker never got partitions:\n{workers.describe()}"
                )
                second.stop()  # rebalance 2: the first worker takes every partition back
                left = True
            assert first.running, workers.describe()
            reader.poll()
            sample()
            time.sleep(2.0)
        producer.finish()
        assert joined and left, "the stream ended before both rebalances"
        missing = reader.wait_for([c["click_id"] for c in clicks], DECIDE_S, lambda: first.running)
        assert not missing, f"{len(missing)} clicks undecided:\n{workers.describe()}"
        sample()  # everything decided, the first worker alone
        # Every partition committed to its end (where the clicks landed, read back).
        landed = TopicReader(settings, CLICKS)
        try:
            landed.read_until(lambda records: len(records) >= len(clicks), 60)
            end: dict[int, int] = {}
            for record in landed.records:
                end[record.partition] = max(end.get(record.partition, 0), record.offset + 1)
        finally:
            landed.close()
        assert sum(end.values()) >= len(clicks), end
        topic = settings.topic(CLICKS)
        assert wait_until(lambda: committed_offsets(settings, group, topic, end) == end, 60), (
            f"committed {committed_offsets(settings, group, topic, end)}, end {end}\n"
            f"{workers.describe()}"
        )
    finally:
        producer.stop_event.set()
        reader.close()
        workers.stop_all()
        redis_server.stop()

    for s in samples:
        print(
            f"soak: sent {s.sent:>6} second={'on ' if s.second_worker else 'off'} "
            f"rss {s.rss_mib:6.1f} MiB | rocksdb {s.records} records, {s.record_bytes:,} B, "
            f"largest {s.largest_record:,} B, {s.decisions} decisions | redis "
            f"{s.redis_keys} keys, {s.redis_used:,} B ({redis_bytes_per_key(s):.0f} B/key), "
            f"largest set {s.largest_set}"
        )
    # Early: the first worker alone, past its first few thousand clicks; late: alone
    # again after both rebalances, to the end.
    early = _window(samples, CLICKS_PER_PHASE // 3, CLICKS_PER_PHASE, second=False)
    late = _window(samples, 2 * CLICKS_PER_PHASE, 3 * CLICKS_PER_PHASE, second=False)
    assert len(early) >= 2 and len(late) >= 2, (len(early), len(late))

    def median(window: list[Sample], figure: Callable[[Sample], float]) -> float:
        return statistics.median(figure(s) for s in window)

    # Every user was seen early on: records stay as many, and as large.
    records, per_record = attrgetter("records"), attrgetter("bytes_per_record")
    assert median(late, records) <= 1.1 * median(early, records) + 20
    assert median(late, per_record) <= 1.5 * median(early, per_record)
    assert max(s.largest_record for s in late) <= 1.5 * max(s.largest_record for s in early)
    # No key grows: sets stop at the cap, and a key holds as many bytes late as early.
    assert max(s.largest_set for s in samples) <= MAX_DISTINCT_MEMBERS
    assert median(late, redis_bytes_per_key) <= 1.5 * median(early, redis_bytes_per_key)
    # The featurizer's caches fill with the new agents and contexts up to their entry
    # bounds (features/limits.py), a few MiB in this run; nothing else may grow.
    rss = attrgetter("rss_mib")
    assert median(late, rss) <= median(early, rss) + 48, (median(early, rss), median(late, rss))
