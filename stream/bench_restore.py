"""``slidr bench --restore USERS``: how long a worker takes to restore a partition's state
from the changelog (``stream.changelog``), per million users.

On the embedded stack (unless Kafka is given): USERS user records of the worker's real
shape (one user's record after a few clicks) go to one partition of a changelog topic,
and as many decided clicks to another; a new, empty store restores each partition whole,
then a store that has them restores a tail of 1 % more. The embedded broker never
compacts, so every record written is read back, as on a Kafka whose cleaner has not yet
run; a compacted log holds at most one record per user and click.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from confluent_kafka import Producer

from features.definitions import state_plan
from features.windows import DEFAULT_ALLOWED_LATENESS_S
from stream.changelog import ChangelogStore, decided_record, ensure_changelog, from_topic
from stream.kafka import CLICKS, ensure_topics, producer_config
from stream.state import RocksStore, decision_key

if TYPE_CHECKING:
    from events.settings import Settings

_START_TS = 1_762_041_600.0
USERS_PARTITION, DECISIONS_PARTITION = 0, 1


def user_record_template(work: Path) -> bytes:
    """A user's record as the worker stores it after five clicks over a few minutes from
    two IPs and two sessions."""
    store = RocksStore(work / "template")
    plan = state_plan("user", DEFAULT_ALLOWED_LATENESS_S)
    rows = [
        ("u:template", _START_TS + 40.0 * i, (f"198.51.100.{i % 2}", f"s{i % 2}")) for i in range(5)
    ]
    store.execute_rows(plan, rows)
    store.commit()
    record = store.db.get(b"e:u:template")
    store.close()
    assert record is not None
    return record


def decision_template() -> bytes:
    """A decision as the worker publishes and stores it."""
    return orjson.dumps(
        {
            "click_id": "c-0000000000",
            "ts": _START_TS,
            "verdict": "valid",
            "score": 0.0123456789,
            "threshold": 0.5123456789,
            "slice": "desktop/logged_out",
            "model_version": "v0001",
            "reasons": [],
            "decided_at": _START_TS + 0.08,
            "degraded": False,
            "replay": False,
            "late": False,
        }
    )


def _produce(
    settings: Settings,
    topic: str,
    partition: int,
    records: Callable[[int], tuple[bytes, bytes]],
    count: int,
    first: int = 0,
) -> float:
    """Produce ``records(i)`` for i from ``first`` on, ``count`` of them, to one
    partition; seconds taken."""
    # Large batches: the embedded broker's fetches slow down with the number of batches.
    producer = Producer(producer_config(settings, linger_ms=100, **{"batch.size": 1_000_000}))
    started = time.perf_counter()
    for i in range(first, first + count):
        key, value = records(i)
        while True:
            try:
                producer.produce(topic, value, key, partition=partition)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10_000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"{remaining} changelog records not acknowledged")
    return time.perf_counter() - started


def run_restore_bench(
    settings: Settings, users: int, progress: Callable[[str], None] = print
) -> dict:
    """Write ``users`` user records and as many decided clicks, restore them whole and
    then a 1 % tail; seconds and records per second of each, and per million."""
    from stream.bench import machine
    from stream.local_stack import LocalStack

    report: dict = {"machine": machine(), "records_per_partition": users}
    with tempfile.TemporaryDirectory(prefix="slidr-bench-restore-") as tmp:
        work = Path(tmp)
        stack = None
        if not settings.kafka_bootstrap:
            stack = LocalStack(work / "home")
            info = stack.up()
            settings = settings.replace(kafka_bootstrap=info.bootstrap, home=work / "home")
        try:
            settings = settings.replace(
                topic_prefix=f"bench-restore-{uuid.uuid4().hex[:8]}-",
                group_id="bench-restore",
                partitions=max(2, settings.partitions),
            )
            ensure_topics(settings, [CLICKS])
            topic = ensure_changelog(settings)
            user = user_record_template(work)
            decision = decision_template()
            report["user_record_bytes"] = len(user) + len(b"e:u:0000000000")
            report["decided_record_bytes"] = len(
                decided_record(decision_key("c-0000000000", _START_TS), decision)
            )

            def user_at(i: int) -> tuple[bytes, bytes]:
                return b"e:u:%010d" % i, user

            def decided_at(i: int) -> tuple[bytes, bytes]:
                where = decision_key(f"c-{i:010d}", _START_TS)
                return where.stored_at, decided_record(where, decision)

            restore = from_topic(settings)
            for name, partition, records in (
                ("users", USERS_PARTITION, user_at),
                ("decided_clicks", DECISIONS_PARTITION, decided_at),
            ):
                progress(f"writing {users:,} {name} records")
                produced_s = _produce(settings, topic, partition, records, users)
                progress(f"restoring {name} into an empty store")
                store = ChangelogStore(work / f"restored-{name}")
                whole = restore(store, partition)
                extra = max(1, users // 100)
                _produce(settings, topic, partition, records, extra, first=users)
                tail = restore(store, partition)
                store.close()
                report[name] = {
                    "records": whole.records,
                    "produce_s": round(produced_s, 2),
                    "restore_s": round(whole.seconds, 2),
                    "records_per_s": round(whole.records / whole.seconds),
                    "restore_s_per_million": round(whole.seconds * 1e6 / max(1, whole.records), 1),
                    "tail_records": tail.records,
                    "tail_restore_s": round(tail.seconds, 3),
                }
                progress(
                    f"{name}: {whole.records:,} records restored in {whole.seconds:.1f} s; "
                    f"a tail of {tail.records:,} in {tail.seconds:.2f} s"
                )
        finally:
            if stack is not None:
                stack.down()
    return report
