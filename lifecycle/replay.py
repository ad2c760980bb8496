"""``slidr replay``: re-decide a range of clicks with a chosen model version.

The range comes from the ``clicks`` topic (partition offsets, or event-time bounds) or
from the Parquet archive (``stream.archive``). Its clicks are put in event-time order,
featurized with the vectorised offline path (``features.batch.compute_features``, equal
to what the worker computes click by click), scored, and published to ``decisions`` with
``replay: true`` and ``decided_at`` = now, so a billing consumer that keeps the latest
decision per click takes the replayed verdict (SPEC §1).

Feature state starts empty at the range start: clicks of the hour/day windows that fell
before it are missing from the counters unless ``warmup_s`` seconds of earlier clicks
are folded in first (they are featurized, never republished). A day and a bit of warmup
(back to the start of the previous UTC day) reproduces the live features exactly.
Alternatively ``use_logged_features`` takes the features the worker logged on
``features.served`` (``SLIDR_LOG_FEATURES``) where they exist.

Event-time bounds are resolved without the broker's timestamp index (ListOffsets by
timestamp is unreliable on Tansu, FINDINGS.md): each partition is bisected on the
clicks' own ``ts``, widened by ``max_disorder_s`` for out-of-order events, then read and
filtered exactly to ``since <= ts < until``. The result is exact when no click sits more
than ``max_disorder_s`` away from its time-ordered place; ``full_scan`` reads every
partition whole instead.

``missing_only`` publishes only for clicks of the range that have no decision at all
(found by scanning the ``decisions`` topic, or the archived decisions for an archive
range), e.g. after an outage. The summary compares new verdicts with the latest earlier
decision of each click when it is known.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from data.dataset import clicks_from_rows
from events.schemas import InvalidEvent, parse_click, parse_ts
from features.batch import compute_features
from features.definitions import N_FEATURES
from models.registry import ModelRegistry, ModelVersion
from stream.engine import decision_record
from stream.kafka import CLICKS, DECISIONS, FEATURES_SERVED

if TYPE_CHECKING:
    from confluent_kafka import Message

    from events.settings import Settings

DEFAULT_MAX_DISORDER_S = 600.0  # twice the worker's allowed lateness (features.windows)
DAY_S = 86_400.0


class ReplayError(RuntimeError):
    """A replay that cannot run as asked; the message says why."""


# -- arguments --------------------------------------------------------------------------


def parse_time(text: str | float | int) -> float:
    """Epoch seconds from a number, an RFC 3339 time or a ``YYYY-MM-DD`` day (UTC midnight)."""
    if isinstance(text, int | float):
        return parse_ts(text)
    value = text.strip()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        try:
            return parse_ts(number)
        except InvalidEvent as exc:
            raise ReplayError(str(exc)) from None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        pass
    else:
        if len(value) == 10:
            return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    try:
        return parse_ts(value)
    except InvalidEvent as exc:
        raise ReplayError(
            f"not an epoch time, RFC 3339 time or YYYY-MM-DD day: {text!r} ({exc})"
        ) from None


def parse_offsets(text: str | None) -> int | dict[int, int] | None:
    """``N`` (every partition) or ``P:N,P:N`` (per partition)."""
    if text is None:
        return None
    try:
        if ":" not in text:
            return int(text)
        out = {}
        for part in text.split(","):
            p, _, n = part.partition(":")
            out[int(p)] = int(n)
        return out
    except ValueError:
        raise ReplayError(f"expected an offset N or PARTITION:OFFSET,... got {text!r}") from None


# -- reading a topic by offsets and by event time ---------------------------------------


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
    """Smallest offset in [lo, hi] whose first valid click (at or after it) has ``ts >= t``.

    ``probe(offset, hi)`` returns (offset of the first valid click at or after ``offset``,
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
        else:  # every offset in [mid, found] leads to this click, which is too early
            lo = found + 1
    if scan is None or lo >= hi:
        return lo
    answer = lo
    for offset, ts in scan(lo, hi):
        if ts is None:
            continue
        if ts >= t:
            return answer
        answer = offset + 1
    return answer


def _click_ts(value: bytes | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_click(value)["ts"]
    except InvalidEvent:
        return None


class TopicScanner:
    """Reads offset ranges of one topic by assignment: no consumer group, no commits."""

    def __init__(
        self, settings: Settings, topic: str, stall_s: float = 20.0, linear_span: int = 2000
    ) -> None:
        from confluent_kafka import Consumer

        from stream.kafka import consumer_config

        self.topic = settings.topic(topic)
        self.stall_s = stall_s
        self.linear_span = linear_span  # bisect down to this many offsets, then read them
        self.consumer = Consumer(
            consumer_config(
                settings,
                group_id=f"slidr-replay-{uuid.uuid4().hex[:12]}",
                enable_partition_eof=False,
            )
        )
        metadata = self.consumer.list_topics(self.topic, timeout=10)
        topic_meta = metadata.topics.get(self.topic)
        if topic_meta is None or topic_meta.error is not None or not topic_meta.partitions:
            self.consumer.close()
            raise ReplayError(
                f"topic {self.topic} does not exist (run `slidr up`, or check SLIDR_TOPIC_PREFIX)"
            )
        self.partitions = sorted(topic_meta.partitions)
        self.probes = 0

    def watermarks(self, partition: int) -> tuple[int, int]:
        """(low, high) offsets of a partition: [low, high) holds its messages.

        Tansu 0.6 answers ListOffsets(latest) with the *first* offset of the last record
        batch plus one, not the end of that batch (measured: 3 batches of 10 records ->
        21, not 30); the high watermark in a fetch response is right. So fetch from the
        listed end minus one and take the fetch's watermark (one cheap fetch on Kafka).
        """
        from confluent_kafka import TopicPartition

        tp = TopicPartition(self.topic, partition)
        low, listed = self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)
        if listed <= low:
            return low, listed
        self.consumer.assign([TopicPartition(self.topic, partition, listed - 1)])
        try:
            deadline = time.monotonic() + self.stall_s
            while time.monotonic() < deadline:
                messages = self.consumer.consume(1, 0.1)
                if any(m.error() is None for m in messages):
                    break
            else:
                raise ReplayError(
                    f"{self.topic}[{partition}]: offset {listed - 1} could not be fetched"
                )
            _, high = self.consumer.get_watermark_offsets(tp, cached=True)
        finally:
            self.consumer.unassign()
        return low, max(listed, high)

    def read(self, ranges: list[OffsetRange], batch: int = 1000) -> Iterator[Message]:
        """Every message in the ranges (each partition in offset order), then stop."""
        from confluent_kafka import TopicPartition

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
                    r = todo.get(msg.partition())
                    if r is None or msg.offset() < r.start:
                        continue
                    last = now
                    if msg.offset() >= r.end:
                        del todo[r.partition]
                        continue
                    yield msg
                    if msg.offset() + 1 >= r.end:
                        del todo[r.partition]
                if not messages and todo:
                    # The range may end with offsets that are never delivered (control
                    # records, compacted gaps): the position says when we are past them.
                    for tp in self.consumer.position([TopicPartition(self.topic, p) for p in todo]):
                        if tp.offset >= 0 and tp.offset >= todo[tp.partition].end:
                            del todo[tp.partition]
                    if todo and now - last > self.stall_s:
                        raise ReplayError(
                            f"{self.topic}: no messages for {self.stall_s:g} s while reading "
                            f"{sorted((r.partition, r.start, r.end) for r in todo.values())}"
                        )
        finally:
            self.consumer.unassign()

    def first_click(self, partition: int, offset: int, end: int) -> tuple[int, float]:
        """(offset, ts) of the first valid click at or after ``offset``; (end, inf) if none."""
        self.probes += 1
        with contextlib.closing(self.read([OffsetRange(partition, offset, end)])) as messages:
            for msg in messages:
                ts = _click_ts(msg.value())
                if ts is not None:
                    return msg.offset(), ts
        return end, math.inf

    def offset_for_time(self, partition: int, t: float, lo: int, hi: int) -> int:
        """First offset in [lo, hi] at which clicks reach event time ``t`` (bisection)."""

        def scan(start: int, end: int) -> Iterator[tuple[int, float | None]]:
            self.probes += 1
            for msg in self.read([OffsetRange(partition, start, end)]):
                yield msg.offset(), _click_ts(msg.value())

        return first_offset_at_or_after(
            lambda offset, end: self.first_click(partition, offset, end),
            lo,
            hi,
            t,
            scan=scan,
            linear_span=self.linear_span,
        )

    def close(self) -> None:
        self.consumer.close()


def resolve_time_range(
    scanner: TopicScanner,
    since: float | None,
    until: float | None,
    max_disorder_s: float = DEFAULT_MAX_DISORDER_S,
    partitions: list[int] | None = None,
    full_scan: bool = False,
) -> list[OffsetRange]:
    """Per partition, offsets that hold every click with ``since <= ts < until``.

    The ranges are widened by ``max_disorder_s`` on both sides; filter by ``ts`` when
    reading them (``read_clicks`` does).
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
    """Offset ranges from ``--from-offset``/``--to-offset`` (clipped to the watermarks).

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
        raise ReplayError(
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


@dataclass
class ClickRead:
    """Clicks read from a topic or the archive: parsed, first copy of each id, in read order."""

    clicks: list[dict] = field(default_factory=list)
    malformed: int = 0
    duplicates: int = 0
    outside: int = 0  # valid clicks read but outside the time bounds


def read_clicks(
    scanner: TopicScanner,
    ranges: list[OffsetRange],
    since: float | None = None,
    until: float | None = None,
) -> ClickRead:
    """Valid clicks of the ranges with ``since <= ts < until``, each ``click_id`` once."""
    out = ClickRead()
    seen: set[str] = set()
    for msg in scanner.read(ranges):
        try:
            click = parse_click(msg.value())
        except InvalidEvent:
            out.malformed += 1
            continue
        ts = click["ts"]
        if (since is not None and ts < since) or (until is not None and ts >= until):
            out.outside += 1
            continue
        if click["click_id"] in seen:
            out.duplicates += 1
            continue
        seen.add(click["click_id"])
        out.clicks.append(click)
    return out


def clicks_between(
    settings: Settings,
    since: float | None,
    until: float | None,
    max_disorder_s: float = DEFAULT_MAX_DISORDER_S,
    full_scan: bool = False,
) -> ClickRead:
    """The clicks on the ``clicks`` topic with ``since <= ts < until`` (epoch seconds)."""
    scanner = TopicScanner(settings, CLICKS)
    try:
        ranges = resolve_time_range(scanner, since, until, max_disorder_s, full_scan=full_scan)
        return read_clicks(scanner, ranges, since, until)
    finally:
        scanner.close()


def latest_decisions(settings: Settings, click_ids: set[str]) -> dict[str, dict]:
    """The latest decision (by ``decided_at``) of each of ``click_ids`` on the decisions
    topic; the whole topic is scanned (it is in decision order, not event-time order)."""
    scanner = TopicScanner(settings, DECISIONS)
    latest: dict[str, dict] = {}
    try:
        ranges = [OffsetRange(p, *scanner.watermarks(p)) for p in scanner.partitions]
        for msg in scanner.read(ranges):
            _keep_latest(latest, msg.value(), click_ids)
    finally:
        scanner.close()
    return latest


def _keep_latest(latest: dict[str, dict], raw: bytes | dict | None, click_ids: set[str]) -> None:
    try:
        decision = raw if isinstance(raw, dict) else orjson.loads(raw or b"")
        click_id = decision["click_id"]
        decided_at = float(decision["decided_at"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return
    if click_id not in click_ids:
        return
    current = latest.get(click_id)
    if current is None or decided_at >= float(current["decided_at"]):
        latest[click_id] = decision


def logged_features(settings: Settings, click_ids: set[str]) -> dict[str, np.ndarray]:
    """Features the worker logged on ``features.served`` for ``click_ids`` (the latest
    record per click; records of another feature layout are ignored)."""
    scanner = TopicScanner(settings, FEATURES_SERVED)
    out: dict[str, np.ndarray] = {}
    try:
        ranges = [OffsetRange(p, *scanner.watermarks(p)) for p in scanner.partitions]
        for msg in scanner.read(ranges):
            try:
                record = orjson.loads(msg.value() or b"")
                click_id = record["click_id"]
                if click_id not in click_ids:
                    continue
                vector = np.asarray(record["features"], dtype=np.float32)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if vector.shape == (N_FEATURES,) and np.all(np.isfinite(vector)):
                out[click_id] = vector
    finally:
        scanner.close()
    return out


# -- the replay -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayOptions:
    """What to replay and how; times in epoch seconds, offsets as in ``offset_ranges``."""

    model_version: str | None = None  # None: the registry's active version
    since: float | None = None
    until: float | None = None
    from_offset: int | dict[int, int] | None = None
    to_offset: int | dict[int, int] | None = None
    partitions: tuple[int, ...] | None = None
    archive: Path | None = None  # read the range from this archive instead of the topic
    warmup_s: float = 0.0
    use_logged_features: bool = False
    missing_only: bool = False
    compare: bool = True  # look up earlier decisions to count verdict changes
    dry_run: bool = False  # decide and summarise, publish nothing
    max_disorder_s: float = DEFAULT_MAX_DISORDER_S
    full_scan: bool = False
    publish_batch: int = 10_000

    @property
    def by_offsets(self) -> bool:
        return self.from_offset is not None or self.to_offset is not None

    def check(self) -> None:
        if self.archive is not None and (self.by_offsets or self.partitions):
            raise ReplayError(
                "--archive ranges are by time only: drop --from-offset/--to-offset/--partitions"
            )
        if not self.by_offsets and self.since is None and self.until is None:
            raise ReplayError("give a range: --since/--until, or --from-offset/--to-offset")
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ReplayError(f"--until ({self.until}) must be after --since ({self.since})")
        if self.warmup_s < 0 or self.max_disorder_s < 0:
            raise ReplayError("--warmup and --max-disorder must not be negative")


@dataclass
class ReplayReport:
    source: str
    model_version: str
    replay_id: str
    clicks_in_range: int = 0
    warmup_clicks: int = 0
    malformed: int = 0
    duplicates: int = 0
    already_decided: int = 0  # --missing-only: clicks skipped because they had a decision
    decisions_published: int = 0
    invalid: int = 0
    logged_features_used: int = 0
    compared: int = 0  # published clicks with an earlier decision
    changes: Counter = field(default_factory=Counter)  # "valid->invalid", "invalid->valid"
    first_ts: float | None = None
    last_ts: float | None = None
    ranges: list[tuple[int, int, int]] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def invalid_share(self) -> float | None:
        return self.invalid / self.decisions_published if self.decisions_published else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model_version": self.model_version,
            "replay_id": self.replay_id,
            "clicks_in_range": self.clicks_in_range,
            "warmup_clicks": self.warmup_clicks,
            "malformed": self.malformed,
            "duplicates": self.duplicates,
            "already_decided": self.already_decided,
            "decisions_published": self.decisions_published,
            "invalid": self.invalid,
            "invalid_share": self.invalid_share,
            "logged_features_used": self.logged_features_used,
            "compared": self.compared,
            "changes": dict(self.changes),
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "ranges": [list(r) for r in self.ranges],
            "dry_run": self.dry_run,
            "seconds": round(self.seconds, 3),
        }

    def __str__(self) -> str:
        span = ""
        if self.first_ts is not None and self.last_ts is not None:
            fmt = "%Y-%m-%dT%H:%M:%SZ"
            span = f" ({time.strftime(fmt, time.gmtime(self.first_ts))} .. {time.strftime(fmt, time.gmtime(self.last_ts))})"
        verb = "would publish" if self.dry_run else "published"
        share = f"{self.invalid_share:.2%}" if self.invalid_share is not None else "n/a"
        lines = [
            f"replay {self.replay_id} with {self.model_version} from {self.source}",
            f"  clicks in range: {self.clicks_in_range:,}{span}; warmup clicks: {self.warmup_clicks:,}; "
            f"malformed skipped: {self.malformed:,}; duplicate copies: {self.duplicates:,}",
            f"  decisions {verb}: {self.decisions_published:,} ({self.invalid:,} invalid, {share})",
        ]
        if self.already_decided:
            lines.append(f"  already decided (skipped, --missing-only): {self.already_decided:,}")
        if self.logged_features_used:
            lines.append(f"  logged features used: {self.logged_features_used:,}")
        if self.compared:
            lines.append(
                f"  vs earlier decisions of {self.compared:,} clicks: "
                f"{self.changes['valid->invalid']:,} valid->invalid, "
                f"{self.changes['invalid->valid']:,} invalid->valid"
            )
        lines.append(f"  {self.seconds:.1f} s")
        return "\n".join(lines)


def _gather_from_topic(
    settings: Settings, o: ReplayOptions, report: ReplayReport, say: Callable[[str], None]
) -> tuple[list[dict], list[dict]]:
    """(range clicks, warmup clicks) from the clicks topic."""
    scanner = TopicScanner(settings, CLICKS)
    partitions = list(o.partitions) if o.partitions else None
    try:
        if o.by_offsets:
            ranges = offset_ranges(scanner, o.from_offset, o.to_offset, partitions)
            read = read_clicks(scanner, ranges, o.since, o.until)
            clicks = read.clicks
        else:
            start = None if o.since is None else o.since - o.warmup_s
            ranges = resolve_time_range(
                scanner, start, o.until, o.max_disorder_s, partitions, o.full_scan
            )
            read = read_clicks(scanner, ranges, start, o.until)
            clicks = read.clicks
        say(
            f"read {sum(r.size for r in ranges):,} messages of {scanner.topic} "
            f"({scanner.probes} bisection probes)"
        )
        report.ranges = [(r.partition, r.start, r.end) for r in ranges]
        report.malformed, report.duplicates = read.malformed, read.duplicates
        if not o.by_offsets:
            if o.since is None:
                return clicks, []
            return [c for c in clicks if c["ts"] >= o.since], [
                c for c in clicks if c["ts"] < o.since
            ]
        if not o.warmup_s or not clicks:
            return clicks, []
        first = o.since if o.since is not None else min(c["ts"] for c in clicks)
        ranges = resolve_time_range(
            scanner, first - o.warmup_s, first, o.max_disorder_s, None, o.full_scan
        )
        ids = {c["click_id"] for c in clicks}
        warmup = [
            c
            for c in read_clicks(scanner, ranges, first - o.warmup_s, first).clicks
            if c["click_id"] not in ids
        ]
        return clicks, warmup
    finally:
        scanner.close()


def _gather_from_archive(o: ReplayOptions, report: ReplayReport) -> tuple[list[dict], list[dict]]:
    from stream.archive import read_archive, rows_of

    start = None if o.since is None else o.since - o.warmup_s
    table = read_archive(o.archive, "clicks", start, o.until)
    clicks, warmup = [], []
    for row in rows_of(table):
        try:
            click = parse_click(row)
        except InvalidEvent:
            report.malformed += 1
            continue
        (warmup if o.since is not None and click["ts"] < o.since else clicks).append(click)
    return clicks, warmup


def _earlier_decisions(settings: Settings, o: ReplayOptions, ids: set[str]) -> dict[str, dict]:
    if o.archive is None:
        return latest_decisions(settings, ids)
    from stream.archive import read_archive, rows_of

    latest: dict[str, dict] = {}
    for decision in rows_of(read_archive(o.archive, "decisions", o.since, o.until)):
        _keep_latest(latest, decision, ids)
    return latest


def replay_decisions(
    model: ModelVersion,
    clicks: list[dict],
    warmup: list[dict],
    decided_at: float,
    replay_id: str,
    logged: dict[str, np.ndarray] | None = None,
    only: set[str] | None = None,
) -> tuple[list[dict], int]:
    """Decisions (SPEC §1, ``replay: true``) for ``clicks`` in event-time order, with the
    features of warmup + range clicks folded together; returns (decisions, logged used).

    ``only``: decide just these click ids (the others still feed the feature state).
    """
    cols = clicks_from_rows(warmup + clicks)
    if not len(cols):
        return [], 0
    features, slices = compute_features(cols)
    wanted = {c["click_id"] for c in clicks} if only is None else only
    rows = np.array([cid in wanted for cid in cols.click_id], dtype=bool)
    index = np.nonzero(rows)[0]
    matrix = features[index]
    used = 0
    if logged:
        for j, i in enumerate(index):
            vector = logged.get(cols.click_id[i])
            if vector is not None:
                matrix[j] = vector
                used += 1
    scores = model.scorer.score(matrix)
    thresholds = model.thresholds_for(slices[index])
    out = []
    for j, i in enumerate(index):
        record = decision_record(
            cols.click_id[i],
            float(cols.ts[i]),
            scores[j],
            thresholds[j],
            str(slices[i]),
            model.version,
            matrix[j],
            decided_at,
            replay=True,
        )
        record["replay_id"] = replay_id
        out.append(record)
    return out, used


def run_replay(
    settings: Settings,
    options: ReplayOptions,
    progress: Callable[[str], None] | None = None,
    registry: ModelRegistry | None = None,
) -> ReplayReport:
    """Replay a range (see the module docstring); returns the summary."""
    options.check()
    say = progress or (lambda _m: None)
    started = time.monotonic()
    registry = registry or ModelRegistry(settings.registry)
    model = registry.load(options.model_version or None)
    source = (
        f"archive {options.archive}"
        if options.archive is not None
        else f"topic {settings.topic(CLICKS)}"
    )
    report = ReplayReport(source, model.version, uuid.uuid4().hex[:12], dry_run=options.dry_run)
    if options.archive is not None:
        clicks, warmup = _gather_from_archive(options, report)
    else:
        clicks, warmup = _gather_from_topic(settings, options, report, say)
    report.clicks_in_range, report.warmup_clicks = len(clicks), len(warmup)
    if clicks:
        report.first_ts = min(c["ts"] for c in clicks)
        report.last_ts = max(c["ts"] for c in clicks)
    say(f"{len(clicks):,} clicks in range, {len(warmup):,} warmup clicks")
    ids = {c["click_id"] for c in clicks}
    earlier: dict[str, dict] = {}
    if ids and (options.compare or options.missing_only):
        earlier = _earlier_decisions(settings, options, ids)
        say(f"{len(earlier):,} clicks of the range have earlier decisions")
    only = None
    if options.missing_only:
        only = ids - earlier.keys()
        report.already_decided = len(ids) - len(only)
    logged = logged_features(settings, ids) if options.use_logged_features and ids else None
    decisions, report.logged_features_used = replay_decisions(
        model, clicks, warmup, time.time(), report.replay_id, logged, only
    )
    for d in decisions:
        report.invalid += d["verdict"] == "invalid"
        old = earlier.get(d["click_id"])
        if old is not None:
            report.compared += 1
            if old.get("verdict") != d["verdict"]:
                report.changes[f"{old.get('verdict')}->{d['verdict']}"] += 1
    if not options.dry_run and decisions:
        _publish(settings, decisions, options.publish_batch, say)
    report.decisions_published = len(decisions)
    report.seconds = time.monotonic() - started
    return report


def _publish(
    settings: Settings, decisions: list[dict], batch: int, say: Callable[[str], None]
) -> None:
    from stream.engine import BatchResult
    from stream.kafka import ensure_topics
    from stream.publisher import Publisher

    ensure_topics(settings, [DECISIONS])
    publisher = Publisher(settings)
    try:
        for s in range(0, len(decisions), batch):
            chunk = decisions[s : s + batch]
            publisher.send(
                BatchResult(decisions=[(d["click_id"].encode(), orjson.dumps(d)) for d in chunk])
            )
            publisher.wait()
            say(f"published {min(s + batch, len(decisions)):,}/{len(decisions):,} decisions")
    finally:
        publisher.close()


# -- command line -----------------------------------------------------------------------


def cmd_replay(args: argparse.Namespace) -> int:
    from events.errors import UsageError
    from events.settings import Settings

    settings = Settings.from_env(registry=args.registry)
    try:
        partitions = (
            tuple(int(p) for p in args.partitions.split(",") if p.strip())
            if args.partitions
            else None
        )
        options = ReplayOptions(
            model_version=args.model,
            since=None if args.since is None else parse_time(args.since),
            until=None if args.until is None else parse_time(args.until),
            from_offset=parse_offsets(args.from_offset),
            to_offset=parse_offsets(args.to_offset),
            partitions=partitions,
            archive=args.archive,
            warmup_s=args.warmup,
            use_logged_features=args.use_logged_features,
            missing_only=args.missing_only,
            compare=not args.no_compare,
            dry_run=args.dry_run,
            max_disorder_s=args.max_disorder,
            full_scan=args.full_scan,
        )

        def progress(message: str) -> None:
            if not args.quiet:
                print(f"replay: {message}", file=sys.stderr, flush=True)

        progress("settings:\n" + settings.describe())
        report = run_replay(settings, options, progress)
    except (ReplayError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    print(orjson.dumps(report.to_dict()).decode() if args.json else report)
    return 0


def register_replay_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``slidr replay`` to the ``slidr`` parser."""
    p = sub.add_parser(
        "replay",
        help="re-decide a range of clicks with a model version and publish replay decisions",
        description="Re-feed a range of the clicks topic (by offsets or event time) or of the "
        "archive through a model version; decisions go to the decisions topic with replay=true "
        "and supersede earlier ones for the same clicks.",
    )
    p.add_argument(
        "--since",
        default=None,
        metavar="TIME",
        help="first event time, inclusive: epoch seconds, RFC 3339 or YYYY-MM-DD (UTC)",
    )
    p.add_argument(
        "--until", default=None, metavar="TIME", help="end event time, exclusive (same forms)"
    )
    p.add_argument(
        "--from-offset",
        default=None,
        metavar="N|P:N,...",
        help="first offset of the clicks topic, for every partition or per partition",
    )
    p.add_argument(
        "--to-offset",
        default=None,
        metavar="N|P:N,...",
        help="end offset, exclusive (default: the end of the partition)",
    )
    p.add_argument(
        "--partitions",
        default=None,
        metavar="P,...",
        help="only these partitions of the clicks topic",
    )
    p.add_argument(
        "--archive",
        type=Path,
        default=None,
        metavar="DIR",
        help="read the range from this archive (slidr archive) instead of the topic",
    )
    p.add_argument(
        "--model", default=None, metavar="VERSION", help="model version (default: the active one)"
    )
    p.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="model registry directory (default: $SLIDR_REGISTRY or var/registry)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="fold in this much earlier traffic into the feature state first, not "
        "republished (default 0: state starts empty at the range start)",
    )
    p.add_argument(
        "--use-logged-features",
        action="store_true",
        help="use the features the worker logged on features.served where present",
    )
    p.add_argument(
        "--missing-only",
        action="store_true",
        help="publish only for clicks of the range that never got a decision",
    )
    p.add_argument(
        "--no-compare",
        action="store_true",
        help="do not scan earlier decisions to count verdict changes",
    )
    p.add_argument("--dry-run", action="store_true", help="decide and summarise, publish nothing")
    p.add_argument(
        "--max-disorder",
        type=float,
        default=DEFAULT_MAX_DISORDER_S,
        metavar="SECONDS",
        help="how far out of event-time order clicks may sit in a partition (default 600)",
    )
    p.add_argument(
        "--full-scan",
        action="store_true",
        help="read whole partitions instead of bisecting for --since/--until",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_replay)
