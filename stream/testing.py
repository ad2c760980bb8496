"""Drive the decision engine without Kafka or Redis: an engine and clicks to feed it.

For tests (and for trying the engine in a notebook); ``models.testing`` registers a
model for it in milliseconds.

- ``standalone_engine``: a ``DecisionEngine`` whose user state is RocksDB in a local
  directory (embedded: no server) and whose shared state, Redis in the worker, is the
  in-memory store (``MemoryStore``) behind the same ``ResilientStore`` the worker uses;
  ``UnreachableStore`` stands in for a Redis that does not answer, ``RefusingRedis`` for
  one that answers with errors (``READONLY``, ``OOM``, ``NOPERM``);
- ``ClickBuilder``: valid clicks (dicts, bytes or consumed messages) with sensible
  defaults, each later than the one before, and any field overridden or left out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import redis

from features.store import MemoryStore, Row, RowPlan, StateStore
from models.registry import ModelVersion
from stream.engine import DecisionEngine, RawMessage
from stream.kafka import CLICKS
from stream.metrics import WorkerMetrics
from stream.state import PartitionStores, ResilientStore

# What a user agent looks like to the featurizer: a browser, and a declared crawler
# (``ua_crawler`` = 1, reason ``known_crawler_ua``).
HUMAN_AGENT = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0 Safari/537.36"
)
CRAWLER_AGENT = "Googlebot/2.1 (+http://www.google.com/bot.html)"
START_TS = 1_762_041_600.0  # 2025-11-02 00:00 UTC, a Sunday


class UnreachableStore(StateStore):
    """A shared store whose every call fails as an unreachable Redis does."""

    def execute_rows(self, plan: RowPlan, rows: Sequence[Row], now: float = 0.0) -> list[Any]:
        raise redis.ConnectionError("unreachable (stream.testing.UnreachableStore)")

    def submit_plans(
        self, jobs: Sequence[tuple[RowPlan, Sequence[Row]]], now: float = 0.0
    ) -> Callable[[], list[list[Any]]]:
        raise redis.ConnectionError("unreachable (stream.testing.UnreachableStore)")

    def expire(self, before: float) -> int:
        return 0


class RefusingRedis:
    """A redis-py client, as ``RedisStore`` uses it, that is reachable but answers every
    script call with ``error``: ``READONLY`` after a failover, ``OOM``, ``NOPERM``, a
    script that fails. ``RedisStore(RefusingRedis(...))`` stands in for such a Redis."""

    def __init__(self, error: redis.RedisError) -> None:
        self.error = error
        self.connection_pool = self
        self.calls = 0

    def register_script(self, _source: str) -> Callable[..., Any]:
        def run_script(**_kwargs: Any) -> Any:  # a reload after NOSCRIPT meets it too
            self.calls += 1
            raise self.error

        run_script.sha = "0" * 40  # type: ignore[attr-defined]
        return run_script

    def get_connection(self, *_args: Any) -> RefusingRedis:
        return self

    def release(self, _connection: Any) -> None:
        pass

    def send_command(self, *_args: Any) -> None:
        self.calls += 1

    def read_response(self) -> Any:
        raise self.error


def memory_shared_state() -> ResilientStore:
    """The worker's shared state with an in-memory store where Redis would be."""
    return ResilientStore(MemoryStore())


def standalone_engine(
    model: ModelVersion,
    state_dir: Path,
    shared: ResilientStore | None = None,
    log_features: bool = True,
    metrics: WorkerMetrics | None = None,
) -> DecisionEngine:
    """A decision engine as the worker builds it, without a broker or Redis.

    User state and stored decisions go to RocksDB under ``state_dir`` (another engine
    on the same directory, with the same ``shared`` state, is the worker after a
    restart); ``shared`` defaults to ``memory_shared_state()``. With ``log_features``
    each fresh decision comes with its feature row in ``BatchResult.served_features``,
    which is how a test reads the counters a click saw. Close with
    ``engine.user_state.close()``.
    """
    return DecisionEngine(
        model,
        PartitionStores(state_dir),
        shared if shared is not None else memory_shared_state(),
        metrics,
        log_features=log_features,
    )


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()  # an override that leaves the field out of the click


class ClickBuilder:
    """Valid clicks: ``c000001``, ``c000002``, ... each ``step_s`` after the previous
    one, from user ``u1`` at one IP with a desktop browser, unless overridden.

    ``click(**fields)`` gives a dict (a field set to ``MISSING`` is left out), ``raw``
    its JSON bytes, ``message`` and ``tombstone`` consumed messages with offsets counted
    per partition.
    """

    def __init__(
        self, start_ts: float = START_TS, step_s: float = 1.0, topic: str = CLICKS
    ) -> None:
        self.next_ts = start_ts
        self.step_s = step_s
        self.topic = topic
        self.count = 0
        self.offsets: dict[int, int] = {}

    def click(self, **fields: Any) -> dict:
        self.count += 1
        click: dict[str, Any] = {
            "click_id": f"c{self.count:06d}",
            "ts": self.next_ts,
            "user_id": "u1",
            "ip": "203.0.113.7",
            "session_id": "s1",
            "user_agent": HUMAN_AGENT,
            "logged_in": False,
            "ad_id": "ad-1",
            "advertiser_id": "adv-1",
        }
        self.next_ts += self.step_s
        click.update(fields)
        return {name: value for name, value in click.items() if value is not MISSING}

    def raw(self, **fields: Any) -> bytes:
        return orjson.dumps(self.click(**fields))

    def message(self, value: dict | bytes | None = None, partition: int = 0) -> RawMessage:
        """A consumed message at ``partition``'s next offset holding ``value``: a click
        dict, any bytes (for dead letters), or by default a new click."""
        if value is None:
            value = self.click()
        payload = orjson.dumps(value) if isinstance(value, dict) else value
        return RawMessage(payload, self.topic, partition, self._next_offset(partition))

    def tombstone(self, partition: int = 0) -> RawMessage:
        """A message without a value (a Kafka tombstone): never a click."""
        return RawMessage(None, self.topic, partition, self._next_offset(partition))

    def _next_offset(self, partition: int) -> int:
        offset = self.offsets.get(partition, 0)
        self.offsets[partition] = offset + 1
        return offset
