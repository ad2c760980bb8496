"""Shared state on a Redis Cluster: three Valkey primaries the test starts on loopback.
The cluster store answers as the reference does, spreads a batch over a few script
calls (one per slot group, pipelined per primary), and a primary killed mid-run
degrades the decisions, never the batch, until it is back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from zlib import crc32

import numpy as np
import pytest

from events.settings import Settings, SettingsError
from features.definitions import ClickFeaturizer, combo_entity, combo_plan, state_plan
from features.store import MemoryStore, Row, RowPlan
from features.windows import COMBOS, DEFAULT_ALLOWED_LATENESS_S
from models.registry import ModelRegistry, ModelVersion
from models.testing import register_logistic_model
from stream.engine import BatchResult, DecisionEngine
from stream.local_stack import free_port
from stream.state import (
    ClusterRedisStore,
    ResilientStore,
    redis_cluster_client,
    shared_ip_state,
    slot_group_tags,
)
from stream.testing import ClickBuilder, standalone_engine
from tests.stream.valkey_servers import ValkeyCluster

NOW = 1_762_041_600.0
SLOT_GROUPS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    started = ValkeyCluster(tmp_path_factory.mktemp("valkey-cluster"))
    try:
        started.start()
        yield started
    finally:
        started.stop()


def cluster_store(cluster: ValkeyCluster) -> ClusterRedisStore:
    return ClusterRedisStore(
        lambda: redis_cluster_client(cluster.url),
        prefix=f"test:{uuid.uuid4().hex[:12]}:",
        slot_groups=SLOT_GROUPS,
    )


def script_calls(cluster: ValkeyCluster) -> list[int]:
    """EVALSHA calls each primary has run since its stats were reset."""
    counts = []
    for node in cluster.nodes:
        stats = node.client().info("commandstats")
        counts.append(int(stats.get("cmdstat_evalsha", {}).get("calls", 0)))
    return counts


def reset_stats(cluster: ValkeyCluster) -> None:
    for node in cluster.nodes:
        node.client().config_resetstat()


def random_rows(n: int, seed: int, entities: list[str]) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows, ts = [], NOW
    for _ in range(n):
        ts += float(rng.choice([0.0, 0.4, 7.0, 61.0, 3600.0], p=[0.1, 0.4, 0.3, 0.15, 0.05]))
        entity = entities[int(rng.integers(0, len(entities)))]
        rows.append((entity, ts, (f"u{rng.integers(0, 9)}", f"s{rng.integers(0, 5)}")))
    return rows


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"SLIDR_REDIS_MODE": "sentinel"}, "SLIDR_REDIS_MODE"),
        ({"SLIDR_REDIS_SLOT_GROUPS": "0"}, "SLIDR_REDIS_SLOT_GROUPS"),
        ({"SLIDR_REDIS_MODE": "cluster", "SLIDR_REDIS_URL": "unix:///tmp/r.sock"}, "cluster"),
        ({"SLIDR_REDIS_MODE": "cluster", "SLIDR_REDIS_KEY_PREFIX": "a{b}:"}, "KEY_PREFIX"),
    ],
)
def test_cluster_settings_that_cannot_work_fail_naming_the_setting(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_slot_group_tags_spread_over_the_slot_ranges() -> None:
    from redis.crc import key_slot

    tags = slot_group_tags(SLOT_GROUPS)
    assert len(set(tags)) == SLOT_GROUPS
    assert [key_slot(t.encode()) * SLOT_GROUPS // 16384 for t in tags] == list(range(SLOT_GROUPS))
    assert slot_group_tags(SLOT_GROUPS) == tags  # the same in every process


def test_the_cluster_store_answers_as_the_reference_in_a_few_calls_a_batch(
    cluster: ValkeyCluster,
) -> None:
    ips = [f"i:10.0.{k // 50}.{k % 50}" for k in range(120)]
    ip_plan = state_plan("ip", DEFAULT_ALLOWED_LATENESS_S)
    jobs: list[tuple[RowPlan, list[Row]]] = [(ip_plan, random_rows(900, 1, ips))]
    for k, combo in enumerate(COMBOS):
        entities = [combo_entity(combo, (ip[2:], f"app{a}")) for ip in ips[:40] for a in range(3)]
        rows = random_rows(900, 2 + k, entities)
        jobs.append(
            (combo_plan(combo, DEFAULT_ALLOWED_LATENESS_S), [(e, t, ()) for e, t, _ in rows])
        )
    jobs.append((state_plan("user", DEFAULT_ALLOWED_LATENESS_S), []))  # no rows this batch
    expected = [MemoryStore().execute(plan.expand(rows)) for plan, rows in jobs]

    store = cluster_store(cluster)
    reset_stats(cluster)
    got: list[list] = [[] for _ in jobs]
    expected_calls, size = 0, 150
    for start in range(0, 900, size):
        batch = [(plan, rows[start : start + size]) for plan, rows in jobs]
        groups = {crc32(r[0].encode()) % SLOT_GROUPS for _, rows in batch for r in rows}
        expected_calls += len(groups)
        for mine, part in zip(got, store.submit_plans(batch, NOW)(), strict=True):
            mine.extend(part)
    store.close()

    assert got == expected
    calls = script_calls(cluster)
    # One call per slot group that the batch touches, at most SLOT_GROUPS, however many
    # clicks; (the first batch's calls may be sent twice if a primary lacked the script)
    assert expected_calls <= sum(calls) <= expected_calls + SLOT_GROUPS
    assert expected_calls <= SLOT_GROUPS * len(range(0, 900, size))
    assert all(calls), f"every primary serves some slot groups: {calls}"
    # A key is named as on one node, after the slot group's hash tag.
    entity, ts, _ = jobs[0][1][-1]
    tag = slot_group_tags(SLOT_GROUPS)[crc32(entity.encode()) % SLOT_GROUPS]
    field = ip_plan.expand_row(jobs[0][1][-1])[0][2]
    client = redis_cluster_client(cluster.url)
    assert (
        int(client.get(f"{store.prefix}{{{tag}}}{entity}|{field}")) == expected[0][-ip_plan.width]
    )
    client.close()


def clicks_at_many_ips(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "click_id": f"c{seed}-{i}",
            "ts": NOW + 3.0 * i,
            "user_id": f"u{rng.integers(0, 20)}",
            "ip": f"198.51.100.{rng.integers(0, 60)}",
            "session_id": f"s{rng.integers(0, 30)}",
            "context": {"app": f"{rng.integers(0, 4)}", "os": "13"},
        }
        for i in range(n)
    ]


def test_features_on_the_cluster_equal_those_counted_in_memory(cluster: ValkeyCluster) -> None:
    clicks = clicks_at_many_ips(600, seed=4)
    on_cluster = ResilientStore(cluster_store(cluster))
    with_cluster = ClickFeaturizer(MemoryStore(), on_cluster)
    reference = ClickFeaturizer(MemoryStore(), MemoryStore())
    for start in range(0, len(clicks), 200):
        batch = clicks[start : start + 200]
        got = with_cluster.featurize(batch).matrix
        assert not on_cluster.degraded
        np.testing.assert_array_equal(got, reference.featurize(batch).matrix)


def test_a_cluster_unreachable_at_start_degrades_the_batch_not_the_start() -> None:
    """redis-py's cluster client reads the slot map when it is built, and raises
    RedisClusterException (not a RedisError) when no node answers."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    shared = ResilientStore(
        ClusterRedisStore(lambda: redis_cluster_client(url, timeout_s=0.2), prefix="gone:")
    )
    plan = state_plan("ip", DEFAULT_ALLOWED_LATENESS_S)
    assert shared.execute_rows(plan, [("i:x", NOW, ("u", "s"))], NOW)[0] == 1
    assert shared.degraded
    shared.close()


@pytest.fixture
def model(tmp_path: Path) -> ModelVersion:
    registry = ModelRegistry(tmp_path / "registry")
    return registry.load(register_logistic_model(registry, {}, bias=-5.0), prefer_gpu=False)


def decide(engine: DecisionEngine, clicks: ClickBuilder, n: int, seed: int) -> BatchResult:
    """A batch of ``n`` clicks from many IPs: every slot group, every primary."""
    rng = np.random.default_rng(seed)
    messages = [
        clicks.message(clicks.click(ip=f"203.0.113.{rng.integers(0, 200)}")) for _ in range(n)
    ]
    result = engine.process(messages)
    assert len(result.decisions) == n and result.dead_letters == []  # the batch goes on
    return result


def test_a_killed_primary_degrades_decisions_until_it_is_back(
    tmp_path: Path, model: ModelVersion, engines: list
) -> None:
    """Through the worker's own wiring (``shared_ip_state`` with SLIDR_REDIS_MODE=cluster):
    a primary killed by pid fails its slot groups (connection refused, then CLUSTERDOWN
    once the others have failed it); every batch is still decided, with local counters
    and marked degraded. Restarted on its port with its nodes.conf (empty: it had no
    persistence, and without its scripts), it serves again and decisions are shared."""
    cluster = ValkeyCluster(tmp_path / "cluster")
    shared: ResilientStore | None = None
    try:
        cluster.start()
        settings = Settings.from_env(
            {"SLIDR_REDIS_MODE": "cluster", "SLIDR_REDIS_SLOT_GROUPS": str(SLOT_GROUPS)}
        )
        shared = shared_ip_state(settings, cluster.url)
        assert isinstance(shared.primary, ClusterRedisStore)
        shared.retry_after_s = 0.1
        engine = standalone_engine(model, tmp_path / "state", shared)
        engines.append(engine)
        clicks = ClickBuilder()
        for seed in range(3):
            assert not decide(engine, clicks, 200, seed).degraded

        victim = cluster.nodes[1]
        victim.kill()
        for seed in range(3, 8):
            assert decide(engine, clicks, 200, seed).degraded
            time.sleep(0.3)  # through the moment the others fail the node (1 s timeout)

        victim.start()
        cluster.wait_healthy()
        deadline = time.monotonic() + 20.0
        seed = 8
        while decide(engine, clicks, 200, seed).degraded:
            assert time.monotonic() < deadline, "decisions never used the cluster again"
            seed += 1
            time.sleep(0.2)
        assert not decide(engine, clicks, 200, seed + 1).degraded
    finally:
        if shared is not None:
            shared.close()
        cluster.stop()


def test_a_primary_that_stops_answering_costs_a_batch_the_answer_timeout_not_more(
    tmp_path: Path,
) -> None:
    """A paused primary accepts connections and never answers: its slot groups time out
    and redis-py resends each of them on its own, a socket timeout (1 s) each. The
    store's answer timeout bounds the whole batch instead; the batch degrades, and the
    cluster serves again once the primary resumes."""
    cluster = ValkeyCluster(tmp_path / "cluster")
    shared: ResilientStore | None = None
    try:
        cluster.start()
        store = ClusterRedisStore(
            lambda: redis_cluster_client(cluster.url),
            prefix="pause:",
            slot_groups=SLOT_GROUPS,
            answer_timeout_s=0.5,
        )
        shared = ResilientStore(store, retry_after_s=0.0)
        plan = state_plan("ip", DEFAULT_ALLOWED_LATENESS_S)
        rows = [(f"i:192.0.2.{k}", NOW, ("u", "s")) for k in range(64)]  # every group
        # The first batch also connects, reads the slot map and loads the script on every
        # primary: let it take what a loaded machine needs before the bound is tested.
        store.answer_timeout_s = 10.0
        assert shared.execute_rows(plan, rows, NOW) and not shared.degraded
        store.answer_timeout_s = 0.5

        cluster.nodes[2].pause()
        started = time.monotonic()
        counted = shared.execute_rows(plan, rows, NOW + 1)
        elapsed = time.monotonic() - started
        assert shared.degraded and counted[0] == 1  # local counters, from zero
        assert elapsed < 3.0, f"one batch waited {elapsed:.1f} s for a paused primary"

        cluster.nodes[2].resume()
        cluster.wait_healthy()
        deadline = time.monotonic() + 20.0
        while True:
            shared.execute_rows(plan, rows, NOW + 2)
            if not shared.degraded:
                break
            assert time.monotonic() < deadline, "decisions never used the cluster again"
            time.sleep(0.2)
    finally:
        if shared is not None:
            shared.close()
        cluster.stop()
