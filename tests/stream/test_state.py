"""The worker's state stores answer plans exactly as the reference (their ops run in
memory) does."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis

from events.settings import Settings
from features.definitions import ClickFeaturizer, combo_entity, combo_plan, state_plan
from features.limits import MAX_DISTINCT_MEMBERS
from features.store import GET, MemoryStore, RowPlan
from features.windows import COMBOS, DAY_S, DEFAULT_ALLOWED_LATENESS_S
from stream.local_stack import free_port
from stream.state import (
    PartitionStores,
    RedisStore,
    ResilientStore,
    RocksStore,
    decision_key,
    redis_client,
)
from stream.testing import RefusingRedis

NOW = 1_762_041_600.0


def random_rows(n: int, seed: int, entities: tuple[str, ...]) -> list[tuple]:
    """Rows of one entity kind with few entities and members, bucket boundaries (exact
    multiples of 10 s and times a hair below them), and days apart."""
    rng = np.random.default_rng(seed)
    rows = []
    ts = NOW - 0.5
    for _ in range(n):
        step = rng.choice(
            [0.0, 0.1, 3.7, 59.9, 3600.0, DAY_S + 1.0], p=[0.1, 0.3, 0.3, 0.2, 0.07, 0.03]
        )
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
    **{f"combo-{c.name}": combo_plan(c, DEFAULT_ALLOWED_LATENESS_S) for c in COMBOS},
}
# Values of combinations that hold what a key format could trip on: the row and field
# separators, quotes, the key's own "|", non-ASCII text, empty values.
COMBO_VALUES = (
    ("1.1.1.1", "", "", "Mozilla/5.0 (X11; Linux x86_64)"),
    ("1.1.1.1", "a|b", "c\x1fd", ""),
    ("1.1.1.1", "a", "b|c\x1fd", ""),  # the same characters, split elsewhere
    ("1.1.1.1", '"', "ü", "\x1e"),
)


# One count and nothing else: the smallest plan, for tests of a store's plumbing.
COUNT = RowPlan(counts=((60, "c1m:", False),), last_seen=False, distincts=(), lateness_s=0.0)


def _in_batches(store, plan: RowPlan, rows: list[tuple], now: float, size: int = 37) -> list:
    out = []
    for start in range(0, len(rows), size):
        out.extend(store.execute_rows(plan, rows[start : start + size], now))
        if isinstance(store, RocksStore):
            store.commit()  # as the engine does after every batch
    return out


def test_rocksdb_store_equals_memory_across_batches_and_reopening(tmp_path: Path) -> None:
    plan = PLANS["user"]
    rows = random_rows(600, seed=1, entities=("u:a", "u:b", "u:c"))
    now = max(ts for _, ts, _ in rows)
    expected = MemoryStore().execute(plan.expand(rows))
    store = RocksStore(tmp_path / "p0")
    got = _in_batches(store, plan, rows[:300], now)
    store.close()
    store = RocksStore(tmp_path / "p0")  # state survives a restart
    got += _in_batches(store, plan, rows[300:], now)
    store.close()
    assert got == expected


def test_uncommitted_changes_do_not_survive_a_crash(tmp_path: Path) -> None:
    row = ("u:a", NOW, ())
    store = RocksStore(tmp_path / "p0")
    store.execute_rows(COUNT, [row], NOW)
    store.commit([(decision_key("click-1", NOW), b"decision")])
    store.execute_rows(COUNT, [row], NOW)  # never committed
    store.close()
    store = RocksStore(tmp_path / "p0")
    assert store.execute_rows(COUNT, [row], NOW) == [2]  # the committed click, and this one
    assert store.decided(decision_key("click-1", NOW)) == b"decision"
    assert store.decided(decision_key("click-2", NOW)) is None
    store.close()


def test_partition_stores_route_and_expire_quiet_users(tmp_path: Path) -> None:
    stores = PartitionStores(tmp_path)
    row = ("u:a", NOW, ())
    out = stores.execute_routed_rows(COUNT, {0: [row], 1: [row]}, NOW)
    assert out == {0: [1], 1: [1]}  # same user id, separate partitions
    for store in stores.stores.values():
        store.commit()
    assert stores.expire(NOW + 2 * 60 + 1) == 2
    assert stores.execute_routed_rows(COUNT, {0: [row]}, NOW) == {0: [1]}  # counted afresh
    stores.close()


@pytest.mark.parametrize("entity", sorted(PLANS))
def test_a_plan_folds_exactly_as_its_expanded_ops(entity: str) -> None:
    """The one-pass fold (memory and RocksDB stores) answers what the plan's ops would."""
    plan = PLANS[entity]
    rows = random_rows(800, seed=4, entities=("e:a", "e:b", "e:c"))
    expected = MemoryStore().execute(plan.expand(rows))
    assert len(expected) == plan.width * len(rows)
    assert MemoryStore().execute_rows(plan, rows, NOW) == expected


@pytest.mark.parametrize("entity", sorted(PLANS))
def test_rocksdb_and_redis_run_plans_as_the_reference_does(
    tmp_path: Path, stream_settings: Settings, entity: str
) -> None:
    plan = PLANS[entity]
    rows = random_rows(800, seed=5, entities=("e:a", "e:b", "e:c"))
    now = max(ts for _, ts, _ in rows)
    expected = MemoryStore().execute(plan.expand(rows))
    rocks = RocksStore(tmp_path / "p0")
    client = redis_client(stream_settings.redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    redis_store = RedisStore(client, prefix=prefix)
    got_rocks, got_redis = [], []
    for start in range(0, len(rows), 53):
        got_rocks += rocks.execute_rows(plan, rows[start : start + 53], now)
        rocks.commit()
        got_redis += redis_store.submit_rows(plan, rows[start : start + 53], now)()
    rocks.close()
    assert got_rocks == expected
    assert got_redis == expected
    # Keys named as the ops name them: prefix, entity, field.
    _, entity, field, _, _ = plan.expand(rows[-1:])[0]
    assert int(client.get(f"{prefix}{entity}|{field}")) == expected[-plan.width]


def test_redis_plan_keys_expire_like_op_keys(stream_settings: Settings) -> None:
    client = redis_client(stream_settings.redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    store = RedisStore(client, prefix=prefix)
    plan = PLANS["user"]
    store.submit_rows(plan, [("u:x", NOW, ("m", "s"))], NOW)()
    ttls = {key.decode(): client.ttl(key) for key in client.keys(prefix + "*")}
    assert len(ttls) == plan.width - sum(previous for _, _, previous in plan.counts) - 1
    for kind, entity, field, _, expire_at in plan.expand_row(("u:x", NOW, ("m", "s"))):
        if kind != GET:
            # From the row's own event time (here NOW); TTL reads round to the second: a
            # slow second may already have passed
            expected = int(expire_at - NOW) + 1
            assert ttls[f"{prefix}{entity}|{field}"] in (expected, expected - 1)


def test_resilient_store_degrades_without_redis_and_recovers(stream_settings: Settings) -> None:
    dead = RedisStore(redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2))
    store = ResilientStore(dead, retry_after_s=0.0)
    assert store.execute_rows(COUNT, [("i:x", NOW, ())], NOW) == [1]
    assert store.degraded
    store.primary = RedisStore(
        redis_client(stream_settings.redis_url), prefix=f"test:{uuid.uuid4().hex}:"
    )
    assert store.execute_rows(COUNT, [("i:x", NOW, ())], NOW) == [1]
    assert not store.degraded


def test_redis_answers_are_read_later_in_any_order(stream_settings: Settings) -> None:
    """``submit_rows`` sends and returns; each batch's answer is its own, whenever it is
    read, and a Redis that lost its scripts (a restart) gets the script again."""
    client = redis_client(stream_settings.redis_url)
    store = RedisStore(client, prefix=f"test:{uuid.uuid4().hex}:")
    plan = PLANS["ip"]
    rows = random_rows(300, seed=3, entities=("i:1.1.1.1", "i:2.2.2.2"))
    now = max(ts for _, ts, _ in rows)
    expected = MemoryStore().execute(plan.expand(rows))
    w = plan.width
    first, second = (
        store.submit_rows(plan, rows[:100], now),
        store.submit_rows(plan, rows[100:200], now),
    )
    assert second() == expected[100 * w : 200 * w]
    assert first() == expected[: 100 * w]
    client.script_flush()
    assert store.submit_rows(plan, rows[200:], now)() == expected[200 * w :]


def test_a_lost_answer_raises_and_gives_the_connection_back(stream_settings: Settings) -> None:
    client = redis_client(stream_settings.redis_url)
    store = RedisStore(client, prefix=f"test:{uuid.uuid4().hex}:")
    pending = store.submit_rows(COUNT, [("i:x", NOW, ())], NOW)
    pool = client.connection_pool
    (conn,) = pool._in_use_connections
    conn.disconnect()  # the connection breaks before the answer is read
    with pytest.raises(redis.ConnectionError):
        pending()
    assert not pool._in_use_connections
    # The next batch reconnects; the lost call may or may not have run on the server.
    assert store.execute_rows(COUNT, [("i:x", NOW, ())], NOW)[0] in (1, 2)


def test_resilient_store_falls_back_when_the_answer_never_comes() -> None:
    class LostAnswer(MemoryStore):  # the request went out; the connection then broke
        def submit_plans(self, jobs, now=0.0):
            def result():
                raise redis.ConnectionError("connection reset by peer")

            return result

    store = ResilientStore(LostAnswer())
    pending = store.submit_plans([(COUNT, [("i:x", NOW, ())]), (COUNT, [("c:x:[]", NOW, ())])], NOW)
    assert not store.degraded  # nothing known yet
    assert pending() == [[1], [1]]  # every plan counted locally instead
    assert store.degraded


def test_redis_rows_refuse_the_separator_instead_of_miscounting(stream_settings: Settings) -> None:
    # parse_click sends such clicks to the DLQ; the store still refuses to split them.
    store = RedisStore(redis_client(stream_settings.redis_url), prefix=f"test:{uuid.uuid4().hex}:")
    with pytest.raises(ValueError, match="contains"):
        store.submit_rows(PLANS["ip"], [("i:1.2.3.4", NOW, ("bob\x1fx", "s1"))], NOW)
    assert store.submit_rows(PLANS["ip"], [("i:1.2.3.4", NOW, ("bob", "s1"))], NOW)()[0] == 1


def test_one_redis_call_runs_several_plans_as_the_reference_does(
    tmp_path: Path, stream_settings: Settings
) -> None:
    """The IP plan and every combination's plan of a batch go in one script call; each
    answers as it would alone, whatever the combination's values hold."""
    ip_rows = random_rows(400, seed=6, entities=("i:1.1.1.1", "i:2.2.2.2"))
    jobs = [(PLANS["ip"], ip_rows)]
    for k, combo in enumerate(COMBOS):
        entities = tuple(combo_entity(combo, values) for values in COMBO_VALUES)
        rows = random_rows(400, seed=7 + k, entities=entities)
        jobs.append(
            (combo_plan(combo, DEFAULT_ALLOWED_LATENESS_S), [(e, ts, ()) for e, ts, _ in rows])
        )
    jobs.append((PLANS["user"], []))  # a plan without rows this batch
    now = max(ts for _, ts, _ in ip_rows)
    expected = [MemoryStore().execute(plan.expand(rows)) for plan, rows in jobs]
    client = redis_client(stream_settings.redis_url)
    store = RedisStore(client, prefix=f"test:{uuid.uuid4().hex}:")
    calls = []
    get_connection = client.connection_pool.get_connection
    client.connection_pool.get_connection = lambda *a, **k: (
        calls.append(1) or get_connection(*a, **k)
    )
    got = [[] for _ in jobs]
    for start in range(0, 400, 61):
        chunk = [(plan, rows[start : start + 61]) for plan, rows in jobs]
        for mine, part in zip(got, store.submit_plans(chunk, now)(), strict=True):
            mine.extend(part)
    assert len(calls) == len(range(0, 400, 61))  # one script call per batch
    assert got == expected
    rocks = RocksStore(tmp_path / "p0")  # the combination plans fold alike on RocksDB
    assert [rocks.execute_rows(plan, rows, now) for plan, rows in jobs] == expected
    rocks.close()
    assert store.submit_plans([(PLANS["ip"], []), (COUNT, [])], now)() == [[], []]


def _talkingdata_clicks(n: int) -> list[dict]:
    rng = np.random.default_rng(8)
    return [
        {
            "click_id": f"c{i}",
            "ts": NOW + 7.0 * i,
            "user_id": f"u{rng.integers(0, 5)}",
            "ip": f"10.0.0.{rng.integers(0, 3)}",
            "context": {
                "app": f"{rng.integers(0, 3)}",
                "os": "13",
                "device": "1",
                "channel": "101",
            },
        }
        for i in range(n)
    ]


def test_without_redis_the_worker_counts_ips_and_combinations_locally() -> None:
    """The degraded path: every shared counter (IPs and combinations) from the local
    fallback, equal to counting in memory, and the batch marked degraded."""
    clicks = _talkingdata_clicks(300)
    dead = RedisStore(redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2))
    shared = ResilientStore(dead, retry_after_s=60.0)
    degraded = ClickFeaturizer(MemoryStore(), shared)
    reference = ClickFeaturizer(MemoryStore(), MemoryStore())
    for start in range(0, len(clicks), 50):
        got = degraded.featurize(clicks[start : start + 50]).matrix
        assert shared.degraded
        np.testing.assert_array_equal(got, reference.featurize(clicks[start : start + 50]).matrix)
    assert any(e.startswith("c:ip_app:") for e in shared.fallback._records)


def test_a_click_resent_across_midnight_is_found_and_the_index_expires_by_day(
    tmp_path: Path,
) -> None:
    """A decided click is found by its id whatever the ``ts`` of the copy that asks (a
    resend may carry a new one); its entry lives through the rest of its click's day and
    the next, by the event-time horizon."""
    midnight = NOW + DAY_S  # NOW is a midnight too
    store = RocksStore(tmp_path / "p0")
    store.commit(
        [
            (decision_key("late-evening", midnight - 1.0), b"first"),
            (decision_key("next-morning", midnight + 60.0), b"second"),
        ]
    )
    assert store.decided(decision_key("late-evening", midnight + 5.0)) == b"first"
    assert store.decided(decision_key("late-evening", midnight - DAY_S)) == b"first"
    store.close()
    store = RocksStore(tmp_path / "p0")  # the index survives a restart
    assert store.decided(decision_key("late-evening", midnight + 3600.0)) == b"first"

    store.expire(midnight + DAY_S - 1.0)  # the late-evening click's next day is not over
    assert store.decided(decision_key("late-evening", midnight)) == b"first"
    store.expire(midnight + DAY_S)  # it is now: forgotten; the next-morning click is not
    assert store.decided(decision_key("late-evening", midnight)) is None
    assert store.decided(decision_key("next-morning", midnight)) == b"second"
    store.expire(midnight + 2 * DAY_S)
    assert store.decided(decision_key("next-morning", midnight)) is None
    store.close()


REDIS_REFUSALS = [
    redis.ResponseError("READONLY You can't write against a read only replica."),
    redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    redis.exceptions.NoPermissionError("this user has no permissions to run the 'evalsha'"),
    redis.ResponseError("ERR Error running script: attempt to compare nil with number"),
    # NOSCRIPT: the script is loaded again, and that fails too.
    redis.exceptions.NoScriptError("No matching script. Please use EVAL."),
]


@pytest.mark.parametrize("error", REDIS_REFUSALS, ids=lambda e: type(e).__name__ + str(e)[:8])
def test_a_redis_that_answers_with_an_error_degrades_instead_of_failing(
    error: redis.RedisError,
) -> None:
    client = RefusingRedis(error)
    store = ResilientStore(RedisStore(client), retry_after_s=0.0)  # type: ignore[arg-type]
    assert store.execute_rows(COUNT, [("i:x", NOW, ())], NOW) == [1]
    assert store.degraded
    assert store.execute_rows(COUNT, [("i:x", NOW, ())], NOW) == [2]  # counted locally
    assert client.calls >= 2  # Redis was asked again, not given up on


def test_distinct_sets_stop_at_the_cap_in_every_store(
    tmp_path: Path, stream_settings: Settings
) -> None:
    """An entity that brings ever new members (a user rotating IPs and sessions): every
    store answers ``min(distinct, MAX_DISTINCT_MEMBERS)`` as the reference does, and
    keeps no more members than that, in RocksDB and in Redis."""
    plan = PLANS["user"]
    cap = MAX_DISTINCT_MEMBERS
    rows = [("u:rotator", NOW + i, (f"ip{i}", f"s{i % (cap + 10)}")) for i in range(3 * cap)]
    rows += [("u:rotator", NOW + 3 * cap, ("ip0", "s0"))]  # one it holds, once full
    expected = MemoryStore().execute(plan.expand(rows))
    _, _, distinct_at = plan.offsets()
    sizes = [expected[k * plan.width + distinct_at[0]] for k in range(len(rows))]
    assert sizes == [*range(1, cap + 1), *[cap] * (len(rows) - cap)]
    rocks = RocksStore(tmp_path / "p0")
    client = redis_client(stream_settings.redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    redis_store = RedisStore(client, prefix=prefix)
    got_rocks = _in_batches(rocks, plan, rows, NOW + 3 * cap, size=50)
    got_redis = redis_store.execute_rows(plan, rows, NOW + 3 * cap)
    assert got_rocks == expected
    assert got_redis == expected
    record = orjson.loads(rocks.db.get(b"e:u:rotator"))
    members = [value for value, _ in record.values() if isinstance(value, list)]
    assert members and all(len(m) == cap for m in members)
    rocks.close()
    sets = [key for key in client.keys(prefix + "*") if client.type(key) == b"set"]
    assert sets and all(client.scard(key) == cap for key in sets)
