"""``slidr replay``: re-decide a range of clicks with a chosen model version.

The range comes from the ``clicks`` topic (partition offsets, or event-time bounds) or
from the Parquet archive (``stream.archive``). Its clicks are put in event-time order,
featurized with the vectorised offline path (``features.batch.compute_features``, equal
to what the worker computes click by click), scored, and published to ``decisions`` with
``replay: true`` and ``decided_at`` = now, so a billing consumer that keeps the latest
decision per click takes the replayed verdict (SPEC §1).

Earlier clicks are folded in first (featurized, never republished), so that the range's
clicks see the counters the live worker saw. By default (``warmup_s`` None) the warm-up
reaches back as far as any feature looks from the range's first click
(``history_start``: the start of the UTC day before it, where the gap since a user's
previous click looks; no counter window is longer than a day), which reproduces the
live features, and a replay through the live version its verdicts. ``warmup_s`` seconds
instead, or 0 for state that starts empty at the range start: replaying the last hour of
a simulated stream that way through the version that decided it changed 7.9% of its
verdicts, none with the default (README, Model lifecycle).
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

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

from data.dataset import clicks_from_rows
from events.errors import SlidrError
from events.schemas import InvalidEvent, check_not_ahead, parse_click, parse_ts
from features.batch import compute_features
from features.definitions import N_FEATURES
from features.windows import COMBOS, COUNTS, DISTINCTS
from models.registry import ModelRegistry, ModelVersion, check_input_width
from stream.engine import decision_record
from stream.kafka import CLICKS, DECISIONS, FEATURES_SERVED
from stream.topics import (
    OffsetRange,
    TopicScanner,
    offset_ranges,
    resolve_time_range,
    scan_topic,
)

if TYPE_CHECKING:
    from events.settings import Settings

DEFAULT_MAX_DISORDER_S = 600.0  # twice the worker's allowed lateness (features.windows)
DAY_S = 86_400.0


class ReplayError(SlidrError, RuntimeError):
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


def parse_warmup(text: str | float | None) -> float | None:
    """``--warmup``: seconds, or ``auto`` (None: back to ``history_start``)."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise ReplayError(f"--warmup: expected SECONDS or auto, got {text!r}") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ReplayError(f"--warmup must be a number of seconds, at least 0, got {text!r}")
    return seconds


def history_start(ts: float) -> float:
    """The earliest event time whose clicks can change the features of a click at ``ts``
    (epoch seconds): the start of the oldest bucket any counter reads (the previous one
    where it reads that too), and of the day before, where the gap since the user's
    previous click looks (``features.windows.GAP_CAP_S``)."""
    starts = [(int(ts // DAY_S) - 1) * DAY_S]
    for spec in COUNTS:
        starts.append((spec.window.bucket(ts) - spec.previous) * spec.window.seconds)
    for distinct in DISTINCTS:
        starts.append(distinct.window.bucket(ts) * distinct.window.seconds)
    for combo in COMBOS:
        starts.extend(w.bucket(ts) * w.seconds for w in combo.windows)
    return float(min(starts))


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


# -- reading clicks and decisions from their topics (stream.topics) --------------------


def _click_ts(value: bytes | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_click(value)["ts"]
    except InvalidEvent:
        return None


def click_scanner(settings: Settings) -> TopicScanner:
    """A scanner of the clicks topic whose event-time bounds bisect on valid clicks' ``ts``."""
    return TopicScanner(settings, CLICKS, event_time=_click_ts)


@dataclass
class ClickRead:
    """Clicks read from a topic or the archive: parsed, first copy of each id, in read order."""

    clicks: list[dict] = field(default_factory=list)
    malformed: int = 0
    duplicates: int = 0
    outside: int = 0  # valid clicks read but outside the time bounds
    ahead: int = 0  # clicks the worker would have dead-lettered: too far ahead of their record


def read_clicks(
    scanner: TopicScanner,
    ranges: list[OffsetRange],
    since: float | None = None,
    until: float | None = None,
    max_future_skew_s: float | None = None,
) -> ClickRead:
    """Valid clicks of the ranges with ``since <= ts < until``, each ``click_id`` once.

    With ``max_future_skew_s``, a click stamped further ahead of its record's timestamp
    on the topic is left out (counted in ``ahead``), as the worker dead-letters a click
    that far ahead of its wall clock: a replay must not decide, and move feature state
    with, clicks the live path refused. The record's timestamp stands in for the
    worker's clock at the time; the worker decided later by its lag, so a click within
    that lag of the bound can be judged differently by the two.
    """
    out = ClickRead()
    seen: set[str] = set()
    for msg in scanner.read(ranges):
        try:
            click = parse_click(msg.value())
        except InvalidEvent:
            out.malformed += 1
            continue
        ts = click["ts"]
        if max_future_skew_s is not None:
            kind, stamped_ms = msg.timestamp()
            if kind != TIMESTAMP_NOT_AVAILABLE:
                try:  # the worker's own check, with the record's time for its clock
                    check_not_ahead(ts, stamped_ms / 1000, max_future_skew_s)
                except InvalidEvent:
                    out.ahead += 1
                    continue
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
    with click_scanner(settings) as scanner:
        ranges = resolve_time_range(scanner, since, until, max_disorder_s, full_scan=full_scan)
        return read_clicks(scanner, ranges, since, until)


def latest_decisions(settings: Settings, click_ids: set[str]) -> dict[str, dict]:
    """The latest decision (by ``decided_at``) of each of ``click_ids`` on the decisions
    topic; the whole topic is scanned (it is in decision order, not event-time order)."""
    latest: dict[str, dict] = {}
    for msg in scan_topic(settings, DECISIONS):
        _keep_latest(latest, msg.value(), click_ids)
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
    out: dict[str, np.ndarray] = {}
    for msg in scan_topic(settings, FEATURES_SERVED):
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
    warmup_s: float | None = None  # None: back to history_start of the range's first click
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
        if (self.warmup_s is not None and self.warmup_s < 0) or self.max_disorder_s < 0:
            raise ReplayError("--warmup and --max-disorder must not be negative")

    def warmup_start(self, first: float) -> float:
        """Where the warm-up starts for a range whose first click is at ``first``."""
        return history_start(first) if self.warmup_s is None else first - self.warmup_s


@dataclass
class ReplayReport:
    source: str
    model_version: str
    replay_id: str
    clicks_in_range: int = 0
    warmup_clicks: int = 0
    malformed: int = 0
    ahead: int = 0  # clicks too far ahead of their record's time (the worker refused them)
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
            "ahead": self.ahead,
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
            first = time.strftime(fmt, time.gmtime(self.first_ts))
            last = time.strftime(fmt, time.gmtime(self.last_ts))
            span = f" ({first} .. {last})"
        verb = "would publish" if self.dry_run else "published"
        share = f"{self.invalid_share:.2%}" if self.invalid_share is not None else "n/a"
        lines = [
            f"replay {self.replay_id} with {self.model_version} from {self.source}",
            f"  clicks in range: {self.clicks_in_range:,}{span}; "
            f"warmup clicks: {self.warmup_clicks:,}; "
            f"malformed skipped: {self.malformed:,}; duplicate copies: {self.duplicates:,}",
            f"  decisions {verb}: {self.decisions_published:,} ({self.invalid:,} invalid, {share})",
        ]
        if self.ahead:
            lines.append(
                f"  ahead of their record's time (skipped, as the worker refuses them): "
                f"{self.ahead:,}"
            )
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
    scanner = click_scanner(settings)
    partitions = list(o.partitions) if o.partitions else None
    skew = settings.max_future_skew_s
    try:
        if o.by_offsets:
            ranges = offset_ranges(scanner, o.from_offset, o.to_offset, partitions)
            read = read_clicks(scanner, ranges, o.since, o.until, skew)
            clicks = read.clicks
        else:
            start = None if o.since is None else o.warmup_start(o.since)
            ranges = resolve_time_range(
                scanner, start, o.until, o.max_disorder_s, partitions, o.full_scan
            )
            read = read_clicks(scanner, ranges, start, o.until, skew)
            clicks = read.clicks
        say(
            f"read {sum(r.size for r in ranges):,} messages of {scanner.topic} "
            f"({scanner.probes} bisection probes)"
        )
        report.ranges = [(r.partition, r.start, r.end) for r in ranges]
        report.malformed, report.duplicates = read.malformed, read.duplicates
        report.ahead = read.ahead
        if not o.by_offsets:
            if o.since is None:
                return clicks, []
            return [c for c in clicks if c["ts"] >= o.since], [
                c for c in clicks if c["ts"] < o.since
            ]
        if o.warmup_s == 0 or not clicks:
            return clicks, []
        first = o.since if o.since is not None else min(c["ts"] for c in clicks)
        start = o.warmup_start(first)
        ranges = resolve_time_range(scanner, start, first, o.max_disorder_s, None, o.full_scan)
        ids = {c["click_id"] for c in clicks}
        warmup = [
            c
            for c in read_clicks(scanner, ranges, start, first, skew).clicks
            if c["click_id"] not in ids
        ]
        return clicks, warmup
    finally:
        scanner.close()


def _gather_from_archive(
    archive: Path, o: ReplayOptions, report: ReplayReport
) -> tuple[list[dict], list[dict]]:
    from stream.archive import read_archive, rows_of

    start = None if o.since is None else o.warmup_start(o.since)
    table = read_archive(archive, "clicks", start, o.until)
    clicks: list[dict] = []
    warmup: list[dict] = []
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
    # The worker's gate: a version of another width or feature spec would score every
    # replayed click wrongly and publish those verdicts as corrections.
    check_input_width(model, N_FEATURES)
    source = (
        f"archive {options.archive}"
        if options.archive is not None
        else f"topic {settings.topic(CLICKS)}"
    )
    report = ReplayReport(source, model.version, uuid.uuid4().hex[:12], dry_run=options.dry_run)
    if options.archive is not None:
        clicks, warmup = _gather_from_archive(options.archive, options, report)
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
