"""User state that follows its partition: a changelog topic and the restore from it.

The worker keeps each ``clicks`` partition's user records and decided-click index in
RocksDB on its own disk (``stream.state.PartitionStores``). With the changelog on
(``SLIDR_STATE_CHANGELOG``, the default) every write of that state also goes to the
partition of the same number of the group's changelog topic, and a worker that is
assigned a partition reads it back before deciding any of its clicks, so a partition
moved to another host (a rescheduled pod, a scale-out, a crash) keeps its counters and
its decisions. Kafka Streams and Quix Streams keep state the same way.

- **Records.** The key is the RocksDB key: ``e:<user_id>`` for a user's record (the
  value is the record, or a tombstone once expiry emptied it) and ``c:<click_id>`` for a
  decided click (the value is its index key, a newline, and the decision; a tombstone
  once expired). Every value is whole, never a delta, so replaying any suffix of the
  log again is harmless and the latest record of a key wins, as compaction keeps it.
- **At least once.** A batch's records (``BatchResult.changelog``) are produced first,
  its decisions once the broker has acknowledged them, and its clicks' offsets become
  committable once the decisions are acknowledged too (``stream.publisher.AckPipeline``):
  a decision that can be read is one whose state a restore finds, so a redelivered
  click gets it back. (Produced side by side, a decision could land first: librdkafka
  sends each partition's batch on its own linger.) Until the acknowledgement the writes
  stay in memory over RocksDB (``ChangelogStore``): the database holds exactly what the
  log has acknowledged, so a crashed worker restarted on the same host only reads the
  log after its last acknowledged offset, which RocksDB keeps beside the state
  (``NEXT_OFFSET_KEY``). A worker on a new host reads the whole partition.
- **Expiry.** The sweep's deletions and shortened records are logged as well (tombstones
  for what it deletes), so a compacted log stays bounded and a restore does not bring
  back what expired. Tansu never compacts (FINDINGS.md): a restore there reads every
  record ever written, and is correct because the last record of each key wins; fields
  that expired and come back from an uncompacted log are dropped on load by the same
  event-time horizon that dropped them before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from confluent_kafka.admin import AdminClient
from rocksdict import WriteBatch

from stream.kafka import CLICKS, admin_config, ensure_topics, state_changelog
from stream.state import DecisionKey, PartitionStores, RocksStore
from stream.topics import OffsetRange, TopicScanner

if TYPE_CHECKING:
    from events.settings import Settings

log = logging.getLogger(__name__)

# The next changelog offset this store has not applied, as ASCII digits. Outside the
# "e:", "c:" and "t:" ranges that state and expiry read.
NEXT_OFFSET_KEY = b"m:changelog-next-offset"
_DECIDED = b"c:"
_INDEX_SEPARATOR = b"\n"  # parse_click keeps control characters out of click ids
_RESTORE_WRITE_EVERY = 10_000  # records per RocksDB write while restoring

Record = tuple[bytes, bytes | None]  # (key, value); None: a tombstone


def decided_record(where: DecisionKey, decision: bytes) -> bytes:
    """A decided click's changelog value: its index key, then the decision."""
    return where.listed_at + _INDEX_SEPARATOR + decision


def apply_records(batch: WriteBatch, records: Iterable[Record]) -> int:
    """Stage changelog ``records`` in ``batch`` as the RocksDB writes they stand for;
    return how many."""
    count = 0
    for key, value in records:
        count += 1
        if value is None:
            # A decided click's index key stays behind: expiry drops it with its day.
            batch.delete(key)
        elif key.startswith(_DECIDED):
            listed_at, _, decision = value.partition(_INDEX_SEPARATOR)
            batch.put(key, decision)
            batch.put(listed_at, b"")
        else:
            batch.put(key, value)
    return count


class ChangelogStore(RocksStore):
    """A ``RocksStore`` whose writes reach RocksDB only once the changelog has them.

    ``commit`` keeps a batch's writes in memory (reads see them) and queues their
    records in ``outbox``; ``acknowledge`` writes them, with the log's next offset, once
    the broker has acknowledged them. Expiry writes RocksDB at once (it only forgets)
    and queues its tombstones.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.outbox: list[Record] = []  # records to publish, in write order
        self.sequence = 0  # commits so far; ``acknowledge`` takes the last one to apply
        self._unacked: dict[bytes, tuple[int, bytes | None]] = {}  # key -> (commit, value)
        self._commits: deque[tuple[int, list[Record]]] = deque()

    @property
    def next_offset(self) -> int:
        """The first changelog offset this store has not applied (0: none applied)."""
        raw = self.db.get(NEXT_OFFSET_KEY)
        return int(raw) if raw is not None else 0

    def _stored(self, key: bytes) -> bytes | None:
        held = self._unacked.get(key)
        return held[1] if held is not None else self.db.get(key)

    def _held(self, key: bytes) -> bool:
        return key in self._pending or key in self._unacked

    def _write(
        self, records: Sequence[Record], decisions: Sequence[tuple[DecisionKey, bytes]]
    ) -> None:
        if not records and not decisions:
            return
        self.sequence += 1
        sequence, unacked = self.sequence, self._unacked
        writes = list(records)
        logged = list(records)
        for key, value in records:
            unacked[key] = (sequence, value)
        for where, decision in decisions:
            # Only the decision is read before the acknowledgement; its index key is
            # read by expiry, from the database.
            unacked[where.stored_at] = (sequence, decision)
            writes.append((where.stored_at, decision))
            writes.append((where.listed_at, b""))
            logged.append((where.stored_at, decided_record(where, decision)))
        self._commits.append((sequence, writes))
        self.outbox.extend(logged)

    def _expired(self, changed: Sequence[Record]) -> None:
        self.outbox.extend(changed)

    def acknowledge(self, through: int, next_offset: int) -> None:
        """Write commits up to number ``through`` to RocksDB: the log holds them, and
        everything before ``next_offset``."""
        batch = WriteBatch(raw_mode=True)
        unacked = self._unacked
        while self._commits and self._commits[0][0] <= through:
            sequence, writes = self._commits.popleft()
            for key, value in writes:
                if value is None:
                    batch.delete(key)
                else:
                    batch.put(key, value)
                held = unacked.get(key)
                if held is not None and held[0] == sequence:  # not rewritten since
                    del unacked[key]
        if next_offset > self.next_offset:
            batch.put(NEXT_OFFSET_KEY, b"%d" % next_offset)
        self.db.write(batch)

    def clear(self) -> None:
        """Forget everything stored (the log was recreated under this store)."""
        self.db.delete_range(b"", b"\xff")
        self._unacked.clear()
        self._commits.clear()
        self.outbox.clear()


@dataclass
class ChangelogBatch:
    """What one decided batch adds to the changelog: ``records`` as (partition, key,
    value), and per partition the store they came from and the last commit they cover."""

    records: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    through: dict[int, tuple[ChangelogStore, int]] = field(default_factory=dict)


@dataclass
class RestoreReport:
    partition: int
    start: int  # the first offset read
    end: int  # the high watermark read up to
    records: int
    seconds: float


class ChangelogStores(PartitionStores):
    """``PartitionStores`` whose partitions are restored from the changelog when opened.

    ``restore(store, partition)`` brings a store up to the log's end (``from_topic``
    for the worker). ``prepare`` restores partitions in a thread, so the event loop
    keeps turning (heartbeats) while a large partition is read, and registers them on
    the loop: only the loop's thread ever changes ``stores``. ``store`` opens and
    restores a partition that was not prepared on the spot.
    """

    def __init__(
        self,
        root: Path,
        restore: Callable[[ChangelogStore, int], RestoreReport],
        open_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(root, open_timeout_s)
        self.restore = restore
        self.restores: list[RestoreReport] = []
        self._restoring: dict[int, asyncio.Future] = {}  # partition -> its restore
        self._unwanted: set[int] = set()  # released while being restored: close after

    def _new_store(self, partition: int) -> ChangelogStore:
        store = ChangelogStore(self.root / f"p{partition}")
        try:
            self.restores.append(self.restore(store, partition))
        except BaseException:
            store.close()
            raise
        return store

    async def prepare(self, partitions: Iterable[int]) -> None:
        """Open and restore the partitions not open yet, off the event loop; a partition
        already being restored is waited for, not restored twice."""
        waits = []
        for partition in partitions:
            if partition in self.stores:
                continue
            self._unwanted.discard(partition)
            restoring = self._restoring.get(partition)
            if restoring is None:
                restoring = self._restoring[partition] = asyncio.ensure_future(
                    self._restore_in_thread(partition)
                )
            waits.append(restoring)
        if waits:
            await asyncio.gather(*waits)

    async def _restore_in_thread(self, partition: int) -> None:
        try:
            store = await asyncio.to_thread(self._open, partition)
        finally:
            del self._restoring[partition]
        if partition in self._unwanted or partition in self.stores:
            self._unwanted.discard(partition)
            store.close()  # revoked while it was being restored
        else:
            self.stores[partition] = store

    def release(self, partitions: Sequence[int]) -> None:
        self._unwanted.update(p for p in partitions if p in self._restoring)
        super().release(partitions)

    def take_changelog(self) -> ChangelogBatch:
        """The records written since the last call, to publish with their batch."""
        batch = ChangelogBatch()
        for partition, store in self.stores.items():
            assert isinstance(store, ChangelogStore)
            if store.outbox:
                batch.records.extend((partition, key, value) for key, value in store.outbox)
                store.outbox = []
                batch.through[partition] = (store, store.sequence)
        return batch

    def acknowledge(self, batch: ChangelogBatch, last_offsets: dict[int, int]) -> None:
        """The broker acknowledged ``batch`` (``last_offsets``: the highest offset it
        gave each partition's records): write it to the stores it came from, if they
        are still open here. A partition released meanwhile reads the records from the
        log when it comes back (the worker drains its acknowledgements before it
        releases partitions, so that they are in the log by then)."""
        for partition, (store, through) in batch.through.items():
            last = last_offsets.get(partition)
            if self.stores.get(partition) is store and last is not None:
                store.acknowledge(through, last + 1)


def from_topic(settings: Settings) -> Callable[[ChangelogStore, int], RestoreReport]:
    """Restores from the changelog topic of ``settings.group_id``."""
    topic = state_changelog(settings.group_id)
    return lambda store, partition: restore(store, settings, topic, partition)


def restore(store: ChangelogStore, settings: Settings, topic: str, partition: int) -> RestoreReport:
    """Apply changelog partition ``partition`` of ``topic`` (a logical name) to
    ``store``, from the store's next offset to the log's end."""
    started = time.perf_counter()
    with TopicScanner(settings, topic) as scanner:
        low, high = scanner.watermarks(partition)
        start = store.next_offset
        if start > high:
            # The log is younger than this state (the topic was deleted and created
            # again): its offsets mean other records now. Start over from it.
            log.warning(
                "%s[%d] ends at %d, before this state's offset %d: restoring it whole",
                topic,
                partition,
                high,
                start,
            )
            store.clear()
            start = 0
        start = max(start, low)
        count = 0
        chunk: list[Record] = []
        for msg in scanner.read([OffsetRange(partition, start, high)]):
            key = msg.key()
            if key is not None:
                chunk.append((key, msg.value()))
            if len(chunk) >= _RESTORE_WRITE_EVERY:
                count += apply_to_store(store, chunk)
                chunk = []
        count += apply_to_store(store, chunk, next_offset=max(high, store.next_offset))
    report = RestoreReport(partition, start, high, count, time.perf_counter() - started)
    log.info(
        "restored %s[%d] offsets %d..%d: %d records in %.2f s",
        topic,
        partition,
        start,
        high,
        count,
        report.seconds,
    )
    return report


def apply_to_store(
    store: ChangelogStore, chunk: Iterable[Record], next_offset: int | None = None
) -> int:
    """Apply changelog records to ``store`` in one write (with ``next_offset``, the
    first offset after them, when given); return how many."""
    batch = WriteBatch(raw_mode=True)
    count = apply_records(batch, chunk)
    if next_offset is not None:
        batch.put(NEXT_OFFSET_KEY, b"%d" % next_offset)
    store.db.write(batch)
    return count


def ensure_changelog(settings: Settings) -> str:
    """Create the group's changelog topic with as many partitions as ``clicks`` has;
    return its full name."""
    admin = AdminClient(admin_config(settings))
    clicks = admin.list_topics(timeout=30).topics.get(settings.topic(CLICKS))
    partitions = len(clicks.partitions) if clicks is not None and clicks.partitions else None
    logical = state_changelog(settings.group_id)
    ensure_topics(settings, [logical], partitions=partitions)
    return settings.topic(logical)
