"""``slidr archive``: clicks, purchases and decisions from Kafka into hourly Parquet files.

Layout, partitioned by each event's event time ``ts`` (UTC)::

    ARCHIVE/clicks/date=YYYY-MM-DD/hour=HH/part-<uuid>.parquet
    ARCHIVE/purchases/date=YYYY-MM-DD/hour=HH/part-<uuid>.parquet
    ARCHIVE/decisions/date=YYYY-MM-DD/hour=HH/part-<uuid>.parquet

Decisions are filed under their click's ``ts``, so a replay published weeks later lands
beside the live decision it supersedes.

Exactly once per event in the files: the consumer (confluent-kafka, a group of its own)
commits offsets only after the files holding everything it consumed are written, so a
crash re-delivers at most the uncommitted tail (at least once); each hour partition
keeps an index of the ids already in its files (read from the files on first use), and
an event whose id is there is counted as a duplicate and not written again. Ids: clicks
by ``click_id``, purchases by ``purchase_id``, decisions by (``click_id``,
``decided_at``, ``model_version``, ``replay``): a re-emitted decision repeats all four,
a replay differs at least in ``decided_at``.

A file is written beside its final name and renamed, so readers never see half a file.
The id index is dropped whenever the group rebalances: another archiver may have written
to the same hours meanwhile. Malformed events (already in the dead-letter topic, put
there by the worker) are counted and skipped.

``read_archive``, ``load_archive`` and ``export_days`` read the files back; an exported
day range is a data set directory for ``slidr train``/``evaluate``/``score``.
"""

from __future__ import annotations

import math
import os
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from data.dataset import DatasetError, read_parquet
from events.arrow import arrow_schema
from events.declarations import CLICK, DECISION, PURCHASE
from events.errors import SlidrError
from events.schemas import InvalidEvent, parse_click, parse_decision, parse_purchase
from features.windows import DAY_S
from stream.kafka import CLICKS, DECISIONS, PURCHASES

if TYPE_CHECKING:
    from events.settings import Settings

HOUR_S = 3600.0
KINDS = ("clicks", "purchases", "decisions")
TOPIC_OF = {"clicks": CLICKS, "purchases": PURCHASES, "decisions": DECISIONS}
DEFAULT_ATTRIBUTION_DELAY_S = DAY_S  # the default attribution window (models.labels)

# One column per declared field (events.declarations), then unknown fields as JSON.
CLICK_SCHEMA = arrow_schema(CLICK, extra="extra")
PURCHASE_SCHEMA = arrow_schema(PURCHASE, extra="extra")
DECISION_SCHEMA = arrow_schema(DECISION, extra="extra")
SCHEMAS = {"clicks": CLICK_SCHEMA, "purchases": PURCHASE_SCHEMA, "decisions": DECISION_SCHEMA}
# Columns that make up an event's id, per kind.
ID_COLUMNS = {
    "clicks": ("click_id",),
    "purchases": ("purchase_id",),
    "decisions": ("click_id", "decided_at", "model_version", "replay"),
}


class ArchiveError(SlidrError, RuntimeError):
    """The archive cannot be read or written as asked; the message says why."""


# -- events -> archive rows -------------------------------------------------------------


_PARSERS: dict[str, Callable[[bytes | str | dict | None], dict]] = {
    "clicks": parse_click,
    "purchases": parse_purchase,
    "decisions": parse_decision,
}


def to_row(kind: str, event: dict) -> dict:
    """The archive row of a parsed event: schema columns, unknown fields as JSON in ``extra``."""
    schema = SCHEMAS[kind]
    row = {name: event.get(name) for name in schema.names if name != "extra"}
    rest = {k: v for k, v in event.items() if k not in schema.names}
    row["extra"] = orjson.dumps(rest).decode() if rest else None
    return row


def event_id(kind: str, row: dict) -> str:
    """The id the archive deduplicates on (see the module docstring)."""
    if kind == "clicks":
        return row["click_id"]
    if kind == "purchases":
        return row["purchase_id"]
    return _decision_id(
        row["click_id"], row["decided_at"], row.get("model_version"), row.get("replay")
    )


def _decision_id(
    click_id: str, decided_at: float, model_version: str | None, replay: bool | None
) -> str:
    return f"{click_id}\x1f{float(decided_at)!r}\x1f{model_version or ''}\x1f{int(bool(replay))}"


def _table_ids(kind: str, table: pa.Table) -> list[str]:
    if kind != "decisions":
        return table.column(ID_COLUMNS[kind][0]).to_pylist()
    columns = [table.column(name).to_pylist() for name in ID_COLUMNS[kind]]
    return [_decision_id(*values) for values in zip(*columns, strict=True)]


# -- partitions -------------------------------------------------------------------------


def hour_partition(ts: float) -> tuple[str, int]:
    """(``YYYY-MM-DD``, hour) of an event time in epoch seconds, UTC."""
    moment = time.gmtime(ts)
    return time.strftime("%Y-%m-%d", moment), moment.tm_hour


def partition_dir(root: Path, kind: str, day: str, hour: int) -> Path:
    return root / kind / f"date={day}" / f"hour={hour:02d}"


def partition_files(directory: Path) -> list[Path]:
    """The finished part files of one hour partition (temporary files excluded)."""
    return sorted(directory.glob("part-*.parquet"))


# The folders above each part file, as ``pyarrow.dataset`` reads them.
HOUR_PARTITIONING = ds.partitioning(
    pa.schema([("date", pa.string()), ("hour", pa.int8())]), flavor="hive"
)


def hours_overlapping(since: float | None, until: float | None) -> ds.Expression | None:
    """A filter on the ``date``/``hour`` folders: the hours that overlap [since, until).

    ``YYYY-MM-DD`` sorts as the days do, so (date, hour) compares as the hours do.
    """

    def at_or_after(day: str, hour: int) -> ds.Expression:
        return (ds.field("date") > day) | ((ds.field("date") == day) & (ds.field("hour") >= hour))

    def at_or_before(day: str, hour: int) -> ds.Expression:
        return (ds.field("date") < day) | ((ds.field("date") == day) & (ds.field("hour") <= hour))

    where = None
    if since is not None:  # the hour holding ``since`` and later ones
        where = at_or_after(*hour_partition(since))
    if until is not None:  # hours that start before ``until``
        last = at_or_before(*hour_partition((math.ceil(until / HOUR_S) - 1) * HOUR_S))
        where = last if where is None else where & last
    return where


# -- writing ----------------------------------------------------------------------------


@dataclass
class WriterCounts:
    """What an ``ArchiveWriter`` did, per kind."""

    written: Counter = field(default_factory=Counter)
    duplicates: Counter = field(default_factory=Counter)
    malformed: Counter = field(default_factory=Counter)
    files: int = 0
    examples: list[str] = field(default_factory=list)  # first malformed reasons


class ArchiveWriter:
    """Buffers events per hour partition and writes each flush as one file per partition.

    No Kafka here: the consumer loop (``run_archive``) and the tests drive it directly.
    ``max_indexed`` bounds how many hour partitions keep their id index in memory; an
    evicted index is read again from the files when its hour comes back.
    """

    def __init__(self, root: Path | str, max_indexed: int = 256, fsync: bool = True) -> None:
        self.root = Path(root)
        self.max_indexed = max_indexed
        self.fsync = fsync
        self.counts = WriterCounts()
        self._index: OrderedDict[tuple[str, str, int], set[str]] = OrderedDict()
        self._buffers: dict[tuple[str, str, int], dict[str, dict]] = {}
        self._buffered = 0
        self._hours: dict[int, tuple[str, int]] = {}  # hour number -> (day, hour), cached

    @property
    def buffered(self) -> int:
        """Events waiting for the next ``flush``."""
        return self._buffered

    def add(self, kind: str, raw: bytes | str | dict | None) -> bool:
        """Parse and buffer one event; False when it is malformed or already archived."""
        try:
            event = _PARSERS[kind](raw)
        except InvalidEvent as exc:
            self.counts.malformed[kind] += 1
            if len(self.counts.examples) < 5:
                self.counts.examples.append(f"{kind}: {exc}")
            return False
        return self.add_row(kind, to_row(kind, event))

    def add_row(self, kind: str, row: dict) -> bool:
        """Buffer an archive row (see ``to_row``); False when its id is already archived."""
        hour_number = int(row["ts"] // HOUR_S)
        where = self._hours.get(hour_number)
        if where is None:
            where = self._hours[hour_number] = hour_partition(hour_number * HOUR_S)
        key = (kind, *where)
        ident = event_id(kind, row)
        buffer = self._buffers.get(key)
        if ident in self._ids(key) or (buffer is not None and ident in buffer):
            self.counts.duplicates[kind] += 1
            return False
        if buffer is None:
            buffer = self._buffers[key] = {}
        buffer[ident] = row
        self._buffered += 1
        return True

    def _ids(self, key: tuple[str, str, int]) -> set[str]:
        ids = self._index.get(key)
        if ids is not None:
            self._index.move_to_end(key)
            return ids
        kind, day, hour = key
        ids = set()
        for path in partition_files(partition_dir(self.root, kind, day, hour)):
            try:
                table = pq.read_table(path, columns=list(ID_COLUMNS[kind]))
            except (OSError, pa.ArrowInvalid) as exc:
                raise ArchiveError(f"{path}: unreadable archive file ({exc})") from None
            ids.update(_table_ids(kind, table))
        self._index[key] = ids
        while len(self._index) > self.max_indexed:
            self._index.popitem(last=False)
        return ids

    def flush(self) -> int:
        """Write every buffered partition to a new file; returns the rows written.

        Only after this returns may the offsets of the events added so far be committed.
        """
        written = 0
        for key in sorted(self._buffers):
            buffer = self._buffers[key]
            kind, day, hour = key
            rows = sorted(buffer.values(), key=lambda r: r["ts"])
            table = pa.Table.from_pylist(rows, schema=SCHEMAS[kind])
            self._write(partition_dir(self.root, kind, day, hour), table)
            self._ids(key).update(buffer)
            self.counts.written[kind] += len(rows)
            self.counts.files += 1
            written += len(rows)
            del self._buffers[key]
            self._buffered -= len(rows)
        return written

    def _write(self, directory: Path, table: pa.Table) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = directory / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        if self.fsync:
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, directory / name)

    def forget_index(self) -> None:
        """Drop the in-memory id indexes (another writer may have added files)."""
        self._index.clear()


# -- reading ----------------------------------------------------------------------------


def read_archive(
    root: Path | str, kind: str, since: float | None = None, until: float | None = None
) -> pa.Table:
    """Events of ``kind`` with ``since <= ts < until`` (epoch seconds), each id once,
    sorted by event time. An empty table (with the schema) when there are none.

    Read through ``pyarrow.dataset``: only the hour folders that overlap the bounds are
    opened (``hours_overlapping``).
    """
    if kind not in KINDS:
        raise ArchiveError(f"unknown archive kind {kind!r} (one of {', '.join(KINDS)})")
    schema = SCHEMAS[kind]
    directory = Path(root) / kind
    if not directory.is_dir():
        return schema.empty_table()
    where = hours_overlapping(since, until)
    if since is not None:
        where &= ds.field("ts") >= since
    if until is not None:
        where &= ds.field("ts") < until
    try:
        table = read_parquet(
            directory,
            columns=schema.names,
            where=where,
            schema=pa.unify_schemas([schema, HOUR_PARTITIONING.schema]),
            partitioning=HOUR_PARTITIONING,
        )
    except DatasetError as exc:
        raise ArchiveError(f"unreadable archive: {exc}") from None
    # Two archivers (or a copied file) could still hold an id twice: keep the first.
    ids = np.array(_table_ids(kind, table), dtype=object)
    if len(ids):
        _, first = np.unique(ids.astype(str), return_index=True)
        if len(first) < len(ids):
            table = table.take(pa.array(np.sort(first)))
    order = pc.sort_indices(table, sort_keys=[("ts", "ascending")])
    return table.take(order)


def rows_of(table: pa.Table) -> list[dict]:
    """Archive rows back as event dicts (as on the topic: ``context`` an object, unknown
    fields restored from ``extra``, absent fields left out)."""
    out = []
    for row in table.to_pylist():
        extra = row.pop("extra", None)
        event = {k: v for k, v in row.items() if v is not None}
        if "context" in event:
            event["context"] = dict(event["context"])
            if not event["context"]:
                del event["context"]
        if extra:
            for k, v in orjson.loads(extra).items():
                event.setdefault(k, v)
        out.append(event)
    return out


def day_bounds(start_day: str | date, end_day: str | date) -> tuple[float, float]:
    """Epoch seconds [start of ``start_day``, end of ``end_day``), both days inclusive, UTC."""

    def start_of(day: str | date) -> float:
        try:
            parsed = day if isinstance(day, date) else date.fromisoformat(str(day))
        except ValueError:
            raise ArchiveError(f"expected a day as YYYY-MM-DD, got {day!r}") from None
        return datetime(parsed.year, parsed.month, parsed.day, tzinfo=UTC).timestamp()

    since, until = start_of(start_day), start_of(end_day) + DAY_S
    if until <= since:
        raise ArchiveError(f"end day {end_day} is before start day {start_day}")
    return since, until


def load_archive(
    root: Path | str,
    start_day: str | date,
    end_day: str | date,
    kinds: Sequence[str] = KINDS,
    attribution_delay_s: float = DEFAULT_ATTRIBUTION_DELAY_S,
    history_s: float = 0.0,
) -> dict[str, pa.Table]:
    """Tables per kind for the UTC days ``start_day`` .. ``end_day`` (inclusive).

    Purchases reach ``attribution_delay_s`` seconds past the last day (purchases made
    after a click still label it) and ``history_s`` seconds before the first (for the
    customers' RFM); clicks and decisions cover the days exactly.
    """
    since, until = day_bounds(start_day, end_day)
    out = {}
    for kind in kinds:
        if kind == "purchases":
            out[kind] = read_archive(root, kind, since - history_s, until + attribution_delay_s)
        else:
            out[kind] = read_archive(root, kind, since, until)
    return out


def export_days(
    root: Path | str,
    start_day: str | date,
    end_day: str | date,
    out_dir: Path | str,
    attribution_delay_s: float = DEFAULT_ATTRIBUTION_DELAY_S,
    history_s: float = 0.0,
    include_decisions: bool = False,
) -> dict[str, int]:
    """Write a data set directory (``clicks.parquet``, ``purchases.parquet``, and with
    ``include_decisions`` ``decisions.parquet``) for a day range; returns rows per file.

    The directory loads with ``data.dataset.load_dataset`` (``slidr train --data``).
    """
    kinds = KINDS if include_decisions else ("clicks", "purchases")
    tables = load_archive(root, start_day, end_day, kinds, attribution_delay_s, history_s)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for kind, table in tables.items():
        path = out_dir / f"{kind}.parquet"
        tmp = out_dir / f".{kind}.parquet.tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
        counts[kind] = table.num_rows
    return counts


def load_archive_dataset(
    root: Path | str,
    start_day: str | date,
    end_day: str | date,
    attribution_delay_s: float = DEFAULT_ATTRIBUTION_DELAY_S,
    history_s: float = 0.0,
):
    """``data.dataset.Dataset`` of a day range, read as ``load_dataset`` reads a directory
    (through a temporary export, so both paths validate and sort the same way)."""
    import tempfile

    from data.dataset import load_dataset

    with tempfile.TemporaryDirectory(prefix="slidr-archive-") as tmp:
        export_days(root, start_day, end_day, tmp, attribution_delay_s, history_s)
        data = load_dataset(tmp)
    data.directory = Path(root)
    return data


# -- the consumer -----------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveOptions:
    out: Path
    group_id: str = "slidr-archive"
    kinds: tuple[str, ...] = KINDS
    idle_s: float | None = None  # stop after this long without messages; None: follow
    flush_interval_s: float = 10.0  # longest time an event waits in memory
    max_buffered: int = 50_000  # flush earlier when this many events wait
    poll_batch: int = 1000  # messages per consume() call
    startup_timeout_s: float = 60.0  # with idle_s: give up when no partition is assigned
    progress_interval_s: float = 5.0


@dataclass
class ArchiveReport:
    consumed: Counter
    written: Counter
    duplicates: Counter
    malformed: Counter
    files: int
    seconds: float
    out: Path
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "seconds": round(self.seconds, 3),
            "files": self.files,
            **{
                name: dict(getattr(self, name))
                for name in ("consumed", "written", "duplicates", "malformed")
            },
        }

    def __str__(self) -> str:
        parts = []
        for kind in KINDS:
            if self.consumed[kind] or self.written[kind]:
                parts.append(
                    f"{kind}: {self.consumed[kind]:,} consumed, {self.written[kind]:,} written, "
                    f"{self.duplicates[kind]:,} duplicates, {self.malformed[kind]:,} malformed"
                )
        text = f"archive {self.out}: {self.files} files in {self.seconds:.1f} s"
        text += ("\n  " + "\n  ".join(parts)) if parts else " (nothing consumed)"
        if self.examples:
            text += "\n  first malformed: " + "; ".join(self.examples)
        return text


def run_archive(
    settings: Settings,
    options: ArchiveOptions,
    progress: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> ArchiveReport:
    """Consume ``options.kinds`` into ``options.out`` until idle (or ``stop`` is set).

    Offsets are committed after each flush, for exactly the messages the flush covers.
    """
    from confluent_kafka import KafkaException

    from stream.topics import TopicTail, position

    say = progress or (lambda _m: None)
    kind_of = {settings.topic(TOPIC_OF[k]): k for k in options.kinds}
    writer = ArchiveWriter(options.out)
    consumed: Counter = Counter()
    pending: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset to commit
    started = time.monotonic()

    def flush_and_commit() -> None:
        if writer.buffered:
            writer.flush()
        if pending:
            try:
                tail.commit(pending)
            except KafkaException as exc:  # e.g. lost the partitions: the next owner dedupes
                say(
                    f"offset commit failed ({exc}); "
                    "the re-delivered events will be skipped as duplicates"
                )
            pending.clear()

    def on_assign(partitions) -> None:
        writer.forget_index()
        say(f"assigned {len(partitions)} partitions")

    def on_revoke(_partitions) -> None:
        flush_and_commit()
        writer.forget_index()

    tail = TopicTail(
        settings,
        [TOPIC_OF[k] for k in options.kinds],
        group_id=options.group_id,
        batch=options.poll_batch,
        wait_s=0.2,
        on_assign=on_assign,
        on_revoke=on_revoke,
    )
    last_flush = last_progress = time.monotonic()
    say(f"archiving {', '.join(options.kinds)} into {options.out} (group {options.group_id})")
    with tail:
        for messages in tail.batches(options.idle_s, stop, options.startup_timeout_s):
            for msg in messages:
                topic, partition, offset = position(msg)
                kind = kind_of[topic]
                consumed[kind] += 1
                writer.add(kind, msg.value())
                pending[(topic, partition)] = offset + 1
            now = time.monotonic()
            if writer.buffered >= options.max_buffered or (
                now - last_flush >= options.flush_interval_s and (writer.buffered or pending)
            ):
                flush_and_commit()
                last_flush = now
            if now - last_progress >= options.progress_interval_s:
                last_progress = now
                c = writer.counts
                say(
                    f"{sum(consumed.values()):,} consumed, {sum(c.written.values()):,} written "
                    f"({', '.join(f'{k} {c.written[k]:,}' for k in options.kinds)}), "
                    f"{sum(c.duplicates.values()):,} duplicates, "
                    f"{sum(c.malformed.values()):,} malformed, "
                    f"{writer.buffered:,} buffered"
                )
        if tail.assigned_at is None and (stop is None or not stop.is_set()):
            say("no partitions assigned: stopping")
        flush_and_commit()
    c = writer.counts
    report = ArchiveReport(
        consumed,
        c.written,
        c.duplicates,
        c.malformed,
        c.files,
        time.monotonic() - started,
        options.out,
        c.examples,
    )
    return report
