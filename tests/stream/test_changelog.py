"""User state that follows its partition (``stream.changelog``).

Driven without Kafka through an in-memory log (``MemoryLog``): an engine whose state is
restored from the log decides like one that had the state all along, a redelivered
click gets its stored decision back, a crash before the log acknowledged a batch leaves
neither its counts nor its decisions behind, and expired state stays expired. The last
test runs the real topic on the embedded broker: offsets from delivery reports, a whole
restore and a tail restore.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from events.settings import Settings
from features.definitions import FEATURE_NAMES
from features.windows import DAY_S
from models.registry import ModelRegistry, ModelVersion
from models.testing import register_logistic_model
from stream.changelog import (
    NEXT_OFFSET_KEY,
    ChangelogStore,
    ChangelogStores,
    RestoreReport,
    apply_to_store,
    decided_record,
    ensure_changelog,
    from_topic,
)
from stream.engine import BatchResult, DecisionEngine
from stream.kafka import state_changelog, topic_spec
from stream.publisher import AckPipeline, Publisher
from stream.state import PartitionStores, ResilientStore, decision_key
from stream.testing import START_TS, ClickBuilder, memory_shared_state
from stream.topics import TopicScanner

USER_FEATURES = [i for i, name in enumerate(FEATURE_NAMES) if name.startswith("u_")]


class MemoryLog:
    """A changelog topic in memory, never compacted: per partition a list of records,
    each at the offset of its index."""

    def __init__(self) -> None:
        self.partitions: dict[int, list[tuple[bytes, bytes | None]]] = defaultdict(list)

    def restore(self, store: ChangelogStore, partition: int) -> RestoreReport:
        records = self.partitions[partition]
        start = store.next_offset
        count = apply_to_store(store, records[start:], next_offset=len(records))
        return RestoreReport(partition, start, len(records), count, 0.0)

    def publish(self, stores: ChangelogStores, acknowledged: bool = True) -> None:
        """Log what the engine wrote since the last call; tell the stores unless the
        worker died before the broker's acknowledgement came back."""
        batch = stores.take_changelog()
        last: dict[int, int] = {}
        for partition, key, value in batch.records:
            self.partitions[partition].append((key, value))
            last[partition] = len(self.partitions[partition]) - 1
        if acknowledged:
            stores.acknowledge(batch, last)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelVersion:
    registry = ModelRegistry(tmp_path_factory.mktemp("changelog-registry"))
    return registry.load(
        register_logistic_model(registry, {"u_clicks_1h": 1.0}, bias=-3.0), prefer_gpu=False
    )


@pytest.fixture
def build(engines: list[DecisionEngine]):
    def engine(model: ModelVersion, stores: PartitionStores, shared: ResilientStore):
        built = DecisionEngine(model, stores, shared, log_features=True)
        engines.append(built)
        return built

    return engine


def batches(n_batches: int = 4, per_batch: int = 12) -> list[list]:
    """Clicks of six users on two partitions (user i on partition i % 2), in batches."""
    clicks = ClickBuilder(step_s=7.0)
    out = []
    for b in range(n_batches):
        out.append(
            [
                clicks.message(
                    clicks.click(user_id=f"u{i % 6}", ip=f"198.51.100.{i % 3}"), partition=i % 2
                )
                for i in range(b * per_batch, (b + 1) * per_batch)
            ]
        )
    return out


def features_by_click(result: BatchResult) -> dict[str, list[float]]:
    return {
        row["click_id"]: row["features"]
        for row in (orjson.loads(value) for _, value in result.served_features)
    }


def decisions_by_click(result: BatchResult) -> dict[str, bytes]:
    return {key.decode(): value for key, value in result.decisions}


def test_a_partition_restored_elsewhere_decides_like_the_single_worker(
    model: ModelVersion, build, tmp_path: Path
) -> None:
    """Worker A decides three batches and the log acknowledges them; A dies before the
    third batch's offsets are committed. Worker B, with an empty state directory of its
    own, restores both partitions from the log: the third batch, redelivered, gets A's
    decisions byte for byte (none decided again on empty state), and the fourth gets the
    decisions and served features of a worker that saw every click."""
    stream = batches()
    reference = build(model, PartitionStores(tmp_path / "ref"), memory_shared_state())
    expected = [reference.process(batch) for batch in stream]

    log, shared = MemoryLog(), memory_shared_state()
    a_stores = ChangelogStores(tmp_path / "a", log.restore)
    a = build(model, a_stores, shared)
    for batch in stream[:3]:
        a.process(batch)
        log.publish(a_stores)
    third_by_a = decisions_by_click(a.process(stream[2]))  # a redelivery at A: stored ones
    a_stores.close()

    b_stores = ChangelogStores(tmp_path / "b", log.restore)
    b = build(model, b_stores, shared)
    redelivered = b.process(stream[2])
    assert decisions_by_click(redelivered) == third_by_a
    assert not redelivered.served_features, "a redelivered click was decided again"
    assert sorted(r.partition for r in b_stores.restores) == [0, 1]
    assert all(r.start == 0 and r.records > 0 for r in b_stores.restores)

    fourth = b.process(stream[3])
    log.publish(b_stores)
    assert features_by_click(fourth) == features_by_click(expected[3])
    for click_id, value in decisions_by_click(fourth).items():
        got, want = orjson.loads(value), orjson.loads(decisions_by_click(expected[3])[click_id])
        assert (got["score"], got["verdict"]) == (want["score"], want["verdict"])


def test_without_the_changelog_the_moved_users_start_empty(
    model: ModelVersion, build, tmp_path: Path
) -> None:
    """What the changelog fixes: B on an empty directory without it undercounts."""
    stream = batches()
    reference = build(model, PartitionStores(tmp_path / "ref"), memory_shared_state())
    expected = [reference.process(batch) for batch in stream][3]
    b = build(model, PartitionStores(tmp_path / "b"), memory_shared_state())
    assert features_by_click(b.process(stream[3])) != features_by_click(expected)


def test_a_crash_before_the_acknowledgement_keeps_neither_counts_nor_decisions(
    model: ModelVersion, build, tmp_path: Path
) -> None:
    """The second batch is decided and written, but the worker dies before the log
    acknowledges it. Restarted on the same directory it reads only the log's tail (none
    of it: nothing was acknowledged after the first batch), finds the second batch
    undecided, and counts it once: its user features equal the single worker's."""
    stream = batches(n_batches=2)
    reference = build(model, PartitionStores(tmp_path / "ref"), memory_shared_state())
    expected = [reference.process(batch) for batch in stream][1]

    log = MemoryLog()
    stores = ChangelogStores(tmp_path / "a", log.restore)
    first = build(model, stores, memory_shared_state())
    first.process(stream[0])
    log.publish(stores)
    acknowledged = {p: len(records) for p, records in log.partitions.items()}
    first.process(stream[1])
    stores.take_changelog()  # queued, never acknowledged: the process dies here
    stores.close()

    again = ChangelogStores(tmp_path / "a", log.restore)
    restarted = build(model, again, memory_shared_state())
    redecided = restarted.process(stream[1])
    assert {r.partition: r.start for r in again.restores} == acknowledged
    assert all(r.records == 0 for r in again.restores)
    got, want = features_by_click(redecided), features_by_click(expected)
    assert got.keys() == want.keys(), "a click of the unacknowledged batch was not decided"
    for click_id, row in got.items():
        assert [row[i] for i in USER_FEATURES] == [want[click_id][i] for i in USER_FEATURES]


def test_reads_see_writes_the_log_has_not_acknowledged_and_the_database_waits(
    tmp_path: Path,
) -> None:
    store = ChangelogStore(tmp_path / "p0")
    where = decision_key("c1", START_TS)
    store.commit([(where, b'{"verdict":"valid"}')])
    assert store.decided(where) == b'{"verdict":"valid"}'
    assert store.db.get(where.stored_at) is None
    assert store.outbox == [(where.stored_at, decided_record(where, b'{"verdict":"valid"}'))]
    store.acknowledge(store.sequence, next_offset=7)
    assert store.db.get(where.stored_at) == b'{"verdict":"valid"}'
    assert store.db.get(where.listed_at) == b""
    assert store.db.get(NEXT_OFFSET_KEY) == b"7"
    store.close()


def test_expired_state_is_tombstoned_and_does_not_come_back_on_restore(
    model: ModelVersion, build, tmp_path: Path
) -> None:
    """A user silent for days expires: the sweep's deletions reach the log, and a
    restore of the whole uncompacted log (as on Tansu) leaves the user and its old
    decisions out."""
    log = MemoryLog()
    stores = ChangelogStores(tmp_path / "a", log.restore)
    engine = build(model, stores, memory_shared_state())
    engine.featurizer.min_sweep_interval_s = 0.0  # sweep whenever event time allows
    clicks = ClickBuilder()
    old = clicks.click(user_id="gone")
    engine.process([clicks.message(old)])
    log.publish(stores)
    clicks.next_ts = START_TS + 5 * DAY_S
    engine.process([clicks.message(clicks.click(user_id="later"))])
    log.publish(stores)
    keys = [key for key, value in log.partitions[0] if value is None]
    assert b"e:u:gone" in keys and b"c:" + old["click_id"].encode() in keys

    restored = ChangelogStore(tmp_path / "b")
    log.restore(restored, 0)
    assert restored.db.get(b"e:u:gone") is None
    assert restored.decided(decision_key(old["click_id"], old["ts"])) is None
    assert restored.db.get(b"e:u:later") is not None
    restored.close()


def test_each_group_s_changelog_is_a_compacted_topic_of_its_own() -> None:
    settings = Settings(partitions=6)
    spec = topic_spec(settings, state_changelog("workers-a"))
    assert spec.topic == "workers-a.state.changelog"
    assert spec.config == {"cleanup.policy": "compact"}
    assert spec.num_partitions == 6
    assert state_changelog("workers-a") != state_changelog("workers-b")


def test_records_go_to_their_partition_of_the_topic_and_restore_whole_then_tail(
    stream_settings, tmp_path: Path
) -> None:
    """On the embedded broker: the offsets the delivery reports give are where the
    records are read back; a new store reads the partition whole, and a store that
    acknowledged them reads only what came after."""
    settings = stream_settings
    ensure_changelog(settings)
    publisher = Publisher(settings)
    fresh = ChangelogStore(tmp_path / "fresh")
    try:
        first = BatchResult(
            changelog=[(p, f"e:u{i}".encode(), b"{}") for i in range(30) for p in (1, 2)]
            + [(2, b"e:u0", None)]
        )
        publisher.send(first)
        publisher.wait()
        with TopicScanner(settings, f"{settings.group_id}.state.changelog") as scanner:
            ends = {r.partition: r.end for r in scanner.whole()}
        assert first.changelog_offsets == {1: 29, 2: 30}
        assert ends == {0: 0, 1: 30, 2: 31, 3: 0}

        restore = from_topic(settings)
        report = restore(fresh, 2)
        assert (report.start, report.end, report.records) == (0, 31, 31)
        assert fresh.db.get(b"e:u0") is None and fresh.db.get(b"e:u29") == b"{}"

        second = BatchResult(changelog=[(2, b"e:u0", b'{"n":1}'), (2, b"e:new", b"{}")])
        publisher.send(second)
        publisher.wait()
        assert second.changelog_offsets == {2: 32}
        tail = restore(fresh, 2)
        assert (tail.start, tail.end, tail.records) == (31, 33, 2)
        assert fresh.db.get(b"e:u0") == b'{"n":1}' and fresh.db.get(b"e:new") == b"{}"
    finally:
        publisher.close()
        fresh.close()


class _Delivered:
    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


class OrderingProducer:
    """Queues messages and acknowledges them on ``poll``, counting offsets per topic and
    partition; refuses (in the report) changelog records while ``refuse_state``."""

    def __init__(self, refuse_state: bool = False) -> None:
        self.refuse_state = refuse_state
        self.queued: list[tuple[str, int, object]] = []
        self.produced: list[str] = []  # topics, in the order produced
        self.offsets: dict[tuple[str, int], int] = defaultdict(int)

    def produce(self, topic, value, key=None, partition=-1, on_delivery=None) -> None:
        self.produced.append(topic)
        self.queued.append((topic, max(partition, 0), on_delivery))

    def poll(self, _timeout: float = 0) -> int:
        queued, self.queued = self.queued, []
        for topic, partition, on_delivery in queued:
            offset = self.offsets[topic, partition]
            self.offsets[topic, partition] += 1
            refused = self.refuse_state and topic == "changelog"
            on_delivery("refused" if refused else None, _Delivered(partition, offset))
        return len(queued)


def _ordering_publisher(producer: OrderingProducer) -> Publisher:
    publisher = Publisher.__new__(Publisher)  # no broker, no librdkafka client
    publisher.producer = producer  # type: ignore[assignment]
    publisher.decisions_topic, publisher.dlq_topic = "decisions", "clicks.dlq"
    publisher.features_topic, publisher.changelog_topic = "features", "changelog"
    publisher._errors = []
    return publisher


def _batch() -> BatchResult:
    return BatchResult(
        decisions=[(b"c1", b"{}"), (b"c2", b"{}")],
        changelog=[(1, b"e:u:a", b"{}"), (1, b"c:c1", b"t\n{}"), (3, b"c:c2", b"t\n{}")],
    )


def test_decisions_are_produced_only_once_the_broker_has_their_state() -> None:
    producer = OrderingProducer()
    pipeline = AckPipeline(_ordering_publisher(producer), serve_every_s=60.0)
    result, safe = _batch(), []

    async def run() -> None:
        await pipeline.submit(result, lambda: safe.append(True))
        assert producer.produced == ["changelog"] * 3  # the state only, so far
        producer.poll()  # the broker acknowledges the state...
        await asyncio.sleep(0)  # ...and the decisions follow on the loop
        assert producer.produced[3:] == ["decisions", "decisions"]
        assert not safe
        producer.poll()
        await asyncio.sleep(0)

    asyncio.run(run())
    assert safe == [True]
    assert result.changelog_offsets == {1: 1, 3: 0}


def test_refused_state_keeps_its_decisions_unpublished_and_the_batch_unsafe() -> None:
    producer = OrderingProducer(refuse_state=True)
    pipeline = AckPipeline(_ordering_publisher(producer), serve_every_s=60.0)
    safe, failed = [], []

    async def run() -> None:
        await pipeline.submit(_batch(), lambda: safe.append(True), failed.append)
        producer.poll()
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(run())
    assert producer.produced == ["changelog"] * 3
    assert not safe and failed and pipeline.failure is not None
