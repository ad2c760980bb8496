"""A real Redis failover: the worker's Redis is demoted to a replica (``REPLICAOF``), so
its writes are answered ``READONLY``; then promoted back. And a real Redis out of memory
or without permission. Each time the decisions degrade (local counters, marked), no
error escapes, the partition goes on deciding, and it is shared again once Redis is.

``tests/stream/test_state.py`` and ``test_engine.py`` cover the same errors with a
client that fakes them; these run them on a Valkey server."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from features.store import RowPlan
from models.registry import ModelRegistry, ModelVersion
from models.testing import register_logistic_model
from stream.engine import BatchResult, DecisionEngine
from stream.local_stack import LOOPBACK
from stream.state import RedisStore, ResilientStore, redis_client
from stream.testing import ClickBuilder, standalone_engine
from tests.stream.valkey_servers import ValkeyServer, wait_until

# The smallest plan: a probe that writes.
COUNT = RowPlan(counts=((60, "c1m:", False),), last_seen=False, distincts=(), lateness_s=0.0)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ValkeyServer, ...]]:
    """A primary and its replica."""
    root = tmp_path_factory.mktemp("valkey-failover")
    # Either may serve the other a full sync; by default a primary waits 5 s for more
    # replicas before it starts one.
    no_wait = ("--repl-diskless-sync-delay", "0")
    primary = ValkeyServer(root / "primary", args=no_wait)
    replica = ValkeyServer(
        root / "replica", args=(*no_wait, "--replicaof", LOOPBACK, str(primary.port))
    )
    try:
        primary.start()
        replica.start()
        wait_until(lambda: _link_up(replica), 15, "the replica's link to its primary")
        yield primary, replica
    finally:
        replica.stop()
        primary.stop()


def _role(server: ValkeyServer) -> str:
    return str(server.client().info("replication")["role"])


def _link_up(replica: ValkeyServer) -> bool:
    return replica.client().info("replication").get("master_link_status") == "up"


@pytest.fixture
def model(tmp_path: Path) -> ModelVersion:
    registry = ModelRegistry(tmp_path / "registry")
    return registry.load(register_logistic_model(registry, {}, bias=-5.0), prefer_gpu=False)


class Partition:
    """One partition's engine on a Redis; ``decide`` runs a batch of it."""

    def __init__(self, engine: DecisionEngine, shared: ResilientStore) -> None:
        self.engine = engine
        self.shared = shared
        self.clicks = ClickBuilder()
        self.rng = np.random.default_rng(1)

    def decide(self, n: int = 50) -> BatchResult:
        messages = [
            self.clicks.message(self.clicks.click(ip=f"203.0.113.{self.rng.integers(0, 20)}"))
            for _ in range(n)
        ]
        result = self.engine.process(messages)
        assert len(result.decisions) == n and result.dead_letters == []
        return result


@pytest.fixture
def partition_on(tmp_path: Path, model: ModelVersion, engines: list[DecisionEngine]):
    def build(url: str) -> Partition:
        # Redis is tried again at every batch, as after retry_after_s in the worker.
        store = RedisStore(redis_client(url), prefix=f"fo:{uuid.uuid4().hex[:10]}:")
        shared = ResilientStore(store, retry_after_s=0.0)
        engine = standalone_engine(model, tmp_path / f"state-{len(engines)}", shared)
        engines.append(engine)
        return Partition(engine, shared)

    return build


def test_a_demoted_primary_answers_readonly_and_decisions_degrade_until_it_is_promoted(
    servers: tuple[ValkeyServer, ValkeyServer], partition_on
) -> None:
    primary, replica = servers
    partition = partition_on(primary.url)
    assert not partition.decide().degraded
    written = primary.client().keys(partition.shared.primary.prefix + "*")
    wait_until(lambda: replica.client().exists(*written) == len(written), 10, "replication")

    # Failover: the replica is promoted and the worker's Redis follows it. The worker
    # still talks to the old primary, which refuses writes.
    replica.client().execute_command("REPLICAOF", "NO", "ONE")
    primary.client().execute_command("REPLICAOF", LOOPBACK, str(replica.port))
    wait_until(lambda: _role(primary) == "slave", 10, "the primary to become a replica")
    probe = RedisStore(redis_client(primary.url), prefix="fo-probe:")
    with pytest.raises(redis.exceptions.ReadOnlyError):
        probe.execute_rows(COUNT, [("i:x", 1.0, ())])
    for _ in range(3):
        assert partition.decide().degraded

    # Promoted back: the same connection details serve again.
    primary.client().execute_command("REPLICAOF", "NO", "ONE")
    replica.client().execute_command("REPLICAOF", LOOPBACK, str(primary.port))
    assert not partition.decide().degraded
    assert not partition.decide().degraded
    wait_until(lambda: _link_up(replica), 15, "the replica to follow its primary again")


def _out_of_memory(server: ValkeyServer) -> Callable[[], None]:
    client = server.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", "1")
    return lambda: client.config_set("maxmemory", "0")


def _permission_revoked(server: ValkeyServer) -> Callable[[], None]:
    # The worker's user may read, not write or run scripts.
    client = server.client()
    client.acl_setuser(
        "slidr-worker", enabled=True, passwords=["+pw"], keys=["*"], commands=["-@all", "+@read"]
    )
    return lambda: client.acl_setuser("slidr-worker", commands=["+@all"])


@pytest.mark.parametrize(
    ("refusal", "error"),
    [
        (_out_of_memory, redis.exceptions.OutOfMemoryError),
        (_permission_revoked, redis.exceptions.NoPermissionError),
    ],
    ids=["oom", "noperm"],
)
def test_a_redis_that_refuses_degrades_decisions_until_it_accepts_again(
    servers: tuple[ValkeyServer, ValkeyServer], partition_on, refusal, error
) -> None:
    primary, _ = servers
    primary.client().acl_setuser(
        "slidr-worker", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all"]
    )
    url = f"redis://slidr-worker:pw@{LOOPBACK}:{primary.port}/0"
    partition = partition_on(url)
    assert not partition.decide().degraded
    heal = refusal(primary)
    try:
        probe = RedisStore(redis_client(url), prefix="fo-probe:")
        with pytest.raises(error):
            probe.execute_rows(COUNT, [("i:x", 1.0, ())])
        for _ in range(3):
            assert partition.decide().degraded
    finally:
        heal()
    assert not partition.decide().degraded
