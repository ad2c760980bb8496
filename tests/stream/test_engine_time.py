"""Time with bounds, driven through the decision engine (``stream.testing``): clicks
ahead of the wall clock, expiry after a rebalance, and the verdict policy for late
clicks (README, Delivery guarantee)."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import orjson
import pytest

from events.settings import Settings
from features.definitions import FEATURE_NAMES
from features.windows import DAY_S, DEFAULT_ALLOWED_LATENESS_S
from models.registry import ModelRegistry, ModelVersion
from models.testing import register_logistic_model
from stream.engine import BatchResult, DecisionEngine
from stream.state import RedisStore, ResilientStore, decision_key, redis_client
from stream.testing import START_TS, ClickBuilder, standalone_engine

TEN_YEARS_S = 10 * 365 * DAY_S


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ModelVersion:
    registry = ModelRegistry(tmp_path_factory.mktemp("time-registry"))
    return registry.load(register_logistic_model(registry, {"ua_crawler": 10.0}, bias=-5.0))


@pytest.fixture
def new_engine(tmp_path: Path, engines: list[DecisionEngine], model: ModelVersion):
    def build(shared: ResilientStore | None = None) -> DecisionEngine:
        engine = standalone_engine(model, tmp_path / "state", shared)
        engines.append(engine)
        return engine

    return build


def decisions(result: BatchResult) -> dict[str, dict]:
    return {orjson.loads(v)["click_id"]: orjson.loads(v) for _, v in result.decisions}


def seen(result: BatchResult, click_id: str, name: str) -> int:
    """One counter a freshly decided click saw (served features hold log1p counts)."""
    for _, value in result.served_features:
        row = orjson.loads(value)
        if row["click_id"] == click_id:
            return round(math.expm1(dict(zip(FEATURE_NAMES, row["features"], strict=True))[name]))
    raise AssertionError(f"{click_id} was not freshly decided")


def test_a_click_ten_years_ahead_is_dead_lettered_and_moves_no_time(new_engine) -> None:
    engine = new_engine()
    clicks = ClickBuilder()  # START_TS is in the past of this machine's clock
    first = [clicks.message() for _ in range(3)]
    engine.process(first)
    watermark = engine.featurizer.watermark
    future = clicks.click(ts=START_TS + TEN_YEARS_S)
    result = engine.process([clicks.message(future)])
    assert result.decisions == []
    (dead,) = [orjson.loads(v) for _, v in result.dead_letters]
    assert "ahead of the worker's clock" in dead["error"]
    assert "SLIDR_MAX_FUTURE_SKEW_S" in dead["error"]
    assert engine.featurizer.watermark == watermark  # no time moved
    assert engine.featurizer.partition_watermarks == {0: watermark}
    # The user's state survived: the next click counts the three before it.
    later = clicks.click()
    result = engine.process([clicks.message(later)])
    assert seen(result, later["click_id"], "u_clicks_1h") == 4
    assert seen(result, later["click_id"], "u_clicks_1d") == 4
    # Its decision is still stored (a sweep to year 2035 would have deleted it).
    stored = engine.user_state.store(0).decided(decision_key("c000001", START_TS))
    assert stored is not None


def test_the_skew_is_measured_against_the_wall_clock_and_never_rejects_the_past(
    new_engine,
) -> None:
    engine = new_engine()
    wall = START_TS + 1000.0
    engine.clock = lambda: wall
    engine.max_future_skew_s = 300.0
    clicks = ClickBuilder(start_ts=START_TS - 400 * DAY_S)
    old = clicks.click()  # a year and more behind the clock: replayed or late, never refused
    within = clicks.click(ts=wall + 300.0)
    beyond = clicks.click(ts=wall + 300.5)
    result = engine.process([clicks.message(c) for c in (old, within, beyond)])
    assert set(decisions(result)) == {old["click_id"], within["click_id"]}
    (dead,) = [orjson.loads(v) for _, v in result.dead_letters]
    assert dead["original"] == orjson.dumps(beyond).decode()
    assert "0.5 s more than" in dead["error"] or "300.5 s ahead" in dead["error"]
    assert engine.metrics.registry.get_sample_value("slidr_dlq_total", {"topic": "clicks"}) == 1


def test_after_a_partition_is_revoked_its_watermark_no_longer_holds_expiry_back(
    new_engine,
) -> None:
    engine = new_engine()
    engine.featurizer.min_sweep_interval_s = 0.0  # sweep whenever an event hour passed
    clicks = ClickBuilder()
    behind = clicks.message(clicks.click(user_id="slow"), partition=1)
    first = clicks.click(user_id="fast")
    engine.process([behind, clicks.message(first, partition=0)])
    ahead = clicks.click(user_id="fast", ts=START_TS + 3 * DAY_S)
    engine.process([clicks.message(ahead, partition=0)])
    store = engine.user_state.store(0)
    # Partition 1 sits at START_TS: nothing of day 0 may be forgotten yet.
    assert store.decided(decision_key(first["click_id"], first["ts"])) is not None
    engine.release_partitions([1])  # the rebalance gave partition 1 to another worker
    assert 1 not in engine.featurizer.partition_watermarks
    assert 1 not in engine.user_state.stores
    then = clicks.click(user_id="fast", ts=START_TS + 3 * DAY_S + 1.0)
    engine.process([clicks.message(then, partition=0)])
    assert store.decided(decision_key(first["click_id"], first["ts"])) is None  # expired


def test_a_late_click_is_decided_flagged_and_counted_in_its_own_windows(new_engine) -> None:
    engine = new_engine()
    clicks = ClickBuilder(start_ts=START_TS + 1800.0)  # mid-hour: one 1h bucket below
    on_time = [clicks.click() for _ in range(3)]
    engine.process([clicks.message(c) for c in on_time])
    newest = on_time[-1]["ts"]
    # Within the allowed lateness: on time. Beyond it: late, still decided.
    barely = clicks.click(ts=newest - DEFAULT_ALLOWED_LATENESS_S)
    late = clicks.click(ts=newest - DEFAULT_ALLOWED_LATENESS_S - 3600.0)
    # Late is judged per partition: far behind partition 0, on time on partition 1.
    other = clicks.click(ts=newest - 2 * 3600.0, user_id="u3")
    result = engine.process(
        [clicks.message(barely), clicks.message(late), clicks.message(other, partition=1)]
    )
    out = decisions(result)
    assert not result.dead_letters
    assert out[barely["click_id"]]["late"] is False
    assert out[late["click_id"]]["late"] is True
    assert out[other["click_id"]]["late"] is False
    # A late click's verdict is the model's on the state its own event time finds: its
    # windows are those of its ts, and it moves no watermark.
    assert out[late["click_id"]]["verdict"] == "valid"
    assert seen(result, late["click_id"], "u_clicks_1h") == 1
    assert seen(result, barely["click_id"], "u_clicks_1h") == 4
    assert engine.featurizer.partition_watermarks[0] == newest
    assert engine.metrics.registry.get_sample_value("slidr_late_clicks_total") == 1


def test_after_a_click_far_ahead_shared_keys_get_ttls_covering_their_windows(
    new_engine, stream_settings: Settings
) -> None:
    client = redis_client(stream_settings.redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    engine = new_engine(ResilientStore(RedisStore(client, prefix=prefix)))
    clicks = ClickBuilder(start_ts=START_TS)
    engine.process([clicks.message()])
    engine.process([clicks.message(clicks.click(ts=START_TS + TEN_YEARS_S))])
    later = clicks.click(ip="198.51.100.9", ts=START_TS + 2.0)
    engine.process([clicks.message(later)])
    day = int(later["ts"] // DAY_S)
    ttl = client.ttl(f"{prefix}i:198.51.100.9|duser1d:{day}")
    # The IP's day set lives until two days after its bucket began, from its own click.
    assert ttl > DAY_S


def test_a_backlog_partition_s_shared_keys_get_ttls_covering_their_windows(
    new_engine, stream_settings: Settings
) -> None:
    client = redis_client(stream_settings.redis_url)
    prefix = f"test:{uuid.uuid4().hex}:"
    engine = new_engine(ResilientStore(RedisStore(client, prefix=prefix)))
    clicks = ClickBuilder()
    live = clicks.message(clicks.click(ts=START_TS + 2 * DAY_S), partition=0)
    backlog = clicks.click(ts=START_TS + 30.0, ip="198.51.100.10", user_id="b")
    engine.process([live, clicks.message(backlog, partition=1)])
    for field, seconds in (("c1m:", 60), ("c1h:", 3600), ("duser1d:", DAY_S)):
        bucket = int(backlog["ts"] // seconds)
        ttl = client.ttl(f"{prefix}i:198.51.100.10|{field}{bucket}")
        expected = (bucket + 2) * seconds + DEFAULT_ALLOWED_LATENESS_S - backlog["ts"]
        assert expected - 2 <= ttl <= expected + 1, (field, ttl, expected)
