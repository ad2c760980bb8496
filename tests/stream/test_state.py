"""The worker's state stores answer feature ops exactly as the in-memory reference does."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from features.store import GET, INCR, MAX, SADD, MemoryStore
from features.windows import DAY_S
from slidr.settings import Settings
from stream.local_stack import free_port
from stream.state import (
    PartitionStores,
    RedisStore,
    ResilientStore,
    RocksStore,
    decision_key,
    redis_client,
)

NOW = 1_762_041_600.0


def random_ops(n: int, seed: int, entities: tuple[str, ...]) -> list[tuple]:
    """Ops of every kind over few entities and fields, so that most of them collide."""
    rng = np.random.default_rng(seed)
    ops = []
    for _ in range(n):
        kind = int(rng.integers(0, 4))
        entity = entities[int(rng.integers(0, len(entities)))]
        if kind == MAX:
            field = f"last:{int(rng.integers(0, 2))}"
            ops.append((MAX, entity, field, NOW + float(rng.integers(0, 1000)) / 8, NOW + DAY_S))
        elif kind == GET:
            field = f"last:{int(rng.integers(0, 2))}" if rng.random() < 0.3 else f"c1m:{int(rng.integers(0, 3))}"
            ops.append((GET, entity, field, None, 0.0))
        elif kind == INCR:
            ops.append((INCR, entity, f"c1m:{int(rng.integers(0, 3))}", None, NOW + 600))
        else:
            member = f"m{int(rng.integers(0, 5))}"
            ops.append((SADD, entity, f"dip1d:{int(rng.integers(0, 2))}", member, NOW + DAY_S))
    return ops


def _in_batches(store, ops: list[tuple], size: int = 37) -> list:
    out = []
    for start in range(0, len(ops), size):
        out.extend(store.execute(ops[start : start + size], NOW))
        if isinstance(store, RocksStore):
            store.commit()  # as the engine does after every batch
    return out


def test_rocksdb_store_equals_memory_across_batches_and_reopening(tmp_path: Path) -> None:
    ops = random_ops(600, seed=1, entities=("u:a", "u:b", "u:c"))
    expected = MemoryStore().execute(ops, NOW)
    store = RocksStore(tmp_path / "p0")
    got = _in_batches(store, ops[:300])
    store.close()
    store = RocksStore(tmp_path / "p0")  # state survives a restart
    got += _in_batches(store, ops[300:])
    store.close()
    assert got == expected


def test_uncommitted_changes_do_not_survive_a_crash(tmp_path: Path) -> None:
    store = RocksStore(tmp_path / "p0")
    store.execute([(INCR, "u:a", "c1m:0", None, NOW + 600)], NOW)
    store.commit([(decision_key("click-1", NOW), b"decision")])
    store.execute([(INCR, "u:a", "c1m:0", None, NOW + 600)], NOW)  # never committed
    store.close()
    store = RocksStore(tmp_path / "p0")
    assert store.execute([(GET, "u:a", "c1m:0", None, 0.0)], NOW) == [1]
    assert store.decided(decision_key("click-1", NOW)) == b"decision"
    assert store.decided(decision_key("click-2", NOW)) is None
    store.close()


def test_partition_stores_route_and_expire_quiet_users(tmp_path: Path) -> None:
    stores = PartitionStores(tmp_path)
    out = stores.execute_routed(
        {0: [(INCR, "u:a", "c1m:0", None, NOW + 600)], 1: [(INCR, "u:a", "c1m:0", None, NOW + 600)]},
        NOW,
    )
    assert out == {0: [1], 1: [1]}  # same user id, separate partitions
    for store in stores.stores.values():
        store.commit()
    assert stores.expire(NOW + 601) == 2
    assert stores.execute_routed({0: [(GET, "u:a", "c1m:0", None, 0.0)]}, NOW) == {0: [None]}
    stores.close()


def test_redis_store_equals_memory(stream_settings: Settings) -> None:
    store = RedisStore(redis_client(stream_settings.redis_url), prefix=f"test:{uuid.uuid4().hex}:")
    ops = random_ops(600, seed=2, entities=("i:1.1.1.1", "i:2.2.2.2"))
    assert _in_batches(store, ops) == MemoryStore().execute(ops, NOW)


def test_resilient_store_degrades_without_redis_and_recovers(stream_settings: Settings) -> None:
    dead = RedisStore(redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2))
    store = ResilientStore(dead, retry_after_s=0.0)
    assert store.execute([(INCR, "i:x", "c1m:0", None, NOW + 600)], NOW) == [1]
    assert store.degraded
    store.primary = RedisStore(redis_client(stream_settings.redis_url), prefix=f"test:{uuid.uuid4().hex}:")
    assert store.execute([(INCR, "i:x", "c1m:0", None, NOW + 600)], NOW) == [1]
    assert not store.degraded


def test_redis_answers_are_read_later_in_any_order(stream_settings: Settings) -> None:
    """``submit`` sends and returns; each batch's answer is its own, whenever it is read,
    and a Redis that lost its scripts (a restart) gets the script again."""
    client = redis_client(stream_settings.redis_url)
    store = RedisStore(client, prefix=f"test:{uuid.uuid4().hex}:")
    ops = random_ops(300, seed=3, entities=("i:1.1.1.1", "i:2.2.2.2"))
    expected = MemoryStore().execute(ops, NOW)
    first, second = store.submit(ops[:100], NOW), store.submit(ops[100:200], NOW)
    assert second() == expected[100:200]
    assert first() == expected[:100]
    client.script_flush()
    assert store.submit(ops[200:], NOW)() == expected[200:]


def test_a_lost_answer_raises_and_gives_the_connection_back(stream_settings: Settings) -> None:
    client = redis_client(stream_settings.redis_url)
    store = RedisStore(client, prefix=f"test:{uuid.uuid4().hex}:")
    pending = store.submit([(INCR, "i:x", "c1m:0", None, NOW + 600)], NOW)
    pool = client.connection_pool
    (conn,) = pool._in_use_connections
    conn.disconnect()  # the connection breaks before the answer is read
    with pytest.raises(redis.ConnectionError):
        pending()
    assert not pool._in_use_connections
    # The next batch reconnects; the lost call may or may not have run on the server.
    assert store.execute([(INCR, "i:x", "c1m:0", None, NOW + 600)], NOW)[0] in (1, 2)


def test_resilient_store_falls_back_when_the_answer_never_comes() -> None:
    class LostAnswer(MemoryStore):  # the request went out; the connection then broke
        def submit(self, ops, now=0.0):
            def result():
                raise redis.ConnectionError("connection reset by peer")

            return result

    store = ResilientStore(LostAnswer())
    pending = store.submit([(INCR, "i:x", "c1m:0", None, NOW + 600)], NOW)
    assert not store.degraded  # nothing known yet
    assert pending() == [1]  # counted locally instead
    assert store.degraded


@pytest.mark.parametrize("kind", [INCR, SADD, MAX])
def test_redis_keys_get_a_time_to_live(stream_settings: Settings, kind: int) -> None:
    client = redis_client(stream_settings.redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    arg = {INCR: None, SADD: "m", MAX: NOW}[kind]
    RedisStore(client, prefix=prefix).execute([(kind, "i:x", "f", arg, NOW + 3600)], NOW)
    assert 3000 < client.ttl(f"{prefix}i:x|f") <= 3601
