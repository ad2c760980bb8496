"""The worker's state stores answer feature ops exactly as the in-memory reference does."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from features.definitions import state_plan
from features.store import GET, INCR, MAX, SADD, MemoryStore, RowPlan
from features.windows import DAY_S, DEFAULT_ALLOWED_LATENESS_S
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
    count = RowPlan(counts=((60, "c1m:", False),), last_seen=False, distincts=(), lateness_s=0.0)
    row = ("u:a", NOW, ())
    out = stores.execute_routed_rows(count, {0: [row], 1: [row]}, NOW)
    assert out == {0: [1], 1: [1]}  # same user id, separate partitions
    for store in stores.stores.values():
        store.commit()
    assert stores.expire(NOW + 2 * 60 + 1) == 2
    assert stores.store(0).execute([(GET, "u:a", f"c1m:{int(NOW // 60)}", None, 0.0)], NOW) == [None]
    stores.close()


def random_rows(n: int, seed: int, entities: tuple[str, ...]) -> list[tuple]:
    """Rows of one entity kind with few entities and members, bucket boundaries (exact
    multiples of 10 s and times a hair below them), and days apart."""
    rng = np.random.default_rng(seed)
    rows = []
    ts = NOW - 0.5
    for _ in range(n):
        step = rng.choice([0.0, 0.1, 3.7, 59.9, 3600.0, DAY_S + 1.0], p=[0.1, 0.3, 0.3, 0.2, 0.07, 0.03])
        ts = float(ts + step)
        if rng.random() < 0.1:
            ts = float(np.ceil(ts / 10) * 10)  # exactly on a boundary
        elif rng.random() < 0.1:
            ts = float(np.nextafter(np.ceil(ts / 10) * 10, 0))  # the last instant before one
        entity = entities[int(rng.integers(0, len(entities)))]
        rows.append((entity, ts, (f"m{rng.integers(0, 4)}", f"s{rng.integers(0, 6)}")))
    return rows


PLANS = {
    "user": state_plan("user", DEFAULT_ALLOWED_LATENESS_S),
    "ip": state_plan("ip", DEFAULT_ALLOWED_LATENESS_S),
}


@pytest.mark.parametrize("entity", sorted(PLANS))
def test_a_plan_folds_exactly_as_its_expanded_ops(entity: str) -> None:
    """The one-pass fold (memory and RocksDB stores) answers what the plan's ops would."""
    plan = PLANS[entity]
    rows = random_rows(800, seed=4, entities=("e:a", "e:b", "e:c"))
    expected = MemoryStore().execute(plan.expand(rows), NOW)
    assert len(expected) == plan.width * len(rows)
    assert MemoryStore().execute_rows(plan, rows, NOW) == expected


@pytest.mark.parametrize("entity", sorted(PLANS))
def test_rocksdb_and_redis_run_plans_as_the_reference_does(
    tmp_path: Path, stream_settings: Settings, entity: str
) -> None:
    plan = PLANS[entity]
    rows = random_rows(800, seed=5, entities=("e:a", "e:b", "e:c"))
    now = max(ts for _, ts, _ in rows)
    expected = MemoryStore().execute(plan.expand(rows), now)
    rocks = RocksStore(tmp_path / "p0")
    redis_store = RedisStore(redis_client(stream_settings.redis_url), prefix=f"test:{uuid.uuid4().hex}:")
    got_rocks, got_redis = [], []
    for start in range(0, len(rows), 53):
        got_rocks += rocks.execute_rows(plan, rows[start : start + 53], now)
        rocks.commit()
        got_redis += redis_store.submit_rows(plan, rows[start : start + 53], now)()
    rocks.close()
    assert got_rocks == expected
    assert got_redis == expected
    # The same keys as the ops path: either path can read what the other wrote.
    op = plan.expand(rows[-1:])[0]
    assert redis_store.execute([(GET, op[1], op[2], None, 0.0)], now)[0] == expected[-plan.width]


def test_redis_plan_keys_expire_like_op_keys(stream_settings: Settings) -> None:
    client = redis_client(stream_settings.redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisStore(client, prefix=prefix)
    plan = PLANS["user"]
    store.submit_rows(plan, [("u:x", NOW, ("m", "s"))], NOW)()
    ttls = {key.decode(): client.ttl(key) for key in client.keys(prefix + "*")}
    assert len(ttls) == plan.width - sum(previous for _, _, previous in plan.counts) - 1
    for (kind, entity, field, _, expire_at) in plan.expand_row(("u:x", NOW, ("m", "s"))):
        if kind != GET:
            # TTL reads round to the second: a slow second may already have passed
            expected = max(60, int(expire_at - NOW) + 1)
            assert ttls[f"{prefix}{entity}|{field}"] in (expected, expected - 1)


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


def test_redis_rows_refuse_the_separator_instead_of_miscounting(stream_settings: Settings) -> None:
    # parse_click sends such clicks to the DLQ; the store still refuses to split them.
    store = RedisStore(redis_client(stream_settings.redis_url), prefix=f"test:{uuid.uuid4().hex}:")
    with pytest.raises(ValueError, match="contains"):
        store.submit_rows(PLANS["ip"], [("i:1.2.3.4", NOW, ("bob\x1fx", "s1"))], NOW)
    assert store.submit_rows(PLANS["ip"], [("i:1.2.3.4", NOW, ("bob", "s1"))], NOW)()[0] == 1
