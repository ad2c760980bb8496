"""The decision engine driven directly, without Kafka or Redis: redeliveries, repeats
within a batch, dead letters, model swaps and a missing Redis (``stream.testing``)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import orjson
import pytest
import redis

from features.definitions import FEATURE_NAMES
from features.windows import DEFAULT_ALLOWED_LATENESS_S
from models.registry import ModelRegistry, ModelVersion
from models.testing import register_logistic_model
from stream.engine import MAX_DEAD_LETTER_BYTES, BatchResult, DecisionEngine
from stream.state import RedisStore, ResilientStore
from stream.testing import (
    CRAWLER_AGENT,
    MISSING,
    START_TS,
    ClickBuilder,
    RefusingRedis,
    UnreachableStore,
    memory_shared_state,
    standalone_engine,
)

MOBILE_AGENT = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)


class Models:
    """Two versions: v1 flags declared crawlers only; v2 scores every click 0.993,
    above the default threshold but under mobile's."""

    def __init__(self, root: Path) -> None:
        registry = ModelRegistry(root)
        self.v1 = registry.load(
            register_logistic_model(registry, {"ua_crawler": 10.0}, bias=-5.0), prefer_gpu=False
        )
        self.v2 = registry.load(
            register_logistic_model(
                registry, {}, bias=5.0, thresholds={"mobile/logged_out": 0.999}
            ),
            prefer_gpu=False,
        )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return Models(tmp_path_factory.mktemp("engine-registry"))


@pytest.fixture
def new_engine(tmp_path: Path, engines: list[DecisionEngine]):
    """Build an engine on the test's state directory (another one on the same directory
    and shared state is the worker after a restart)."""

    def build(model: ModelVersion, shared: ResilientStore | None = None) -> DecisionEngine:
        engine = standalone_engine(model, tmp_path / "state", shared)
        engines.append(engine)
        return engine

    return build


@pytest.fixture
def engine(new_engine, models: Models) -> DecisionEngine:
    return new_engine(models.v1)


def decided(result: BatchResult) -> dict[str, dict]:
    """The batch's decisions by click id; a click decided twice must be decided alike."""
    out: dict[str, dict] = {}
    for key, value in result.decisions:
        decision = orjson.loads(value)
        assert key == decision["click_id"].encode()
        assert out.setdefault(decision["click_id"], decision) == decision
    return out


def counts_seen(result: BatchResult, click_id: str) -> dict[str, int]:
    """The counters a freshly decided click saw (its served features hold log1p counts)."""
    for _, value in result.served_features:
        row = orjson.loads(value)
        if row["click_id"] == click_id:
            features = dict(zip(FEATURE_NAMES, row["features"], strict=True))
            return {
                name: round(math.expm1(features[name]))
                for name in ("u_clicks_1h", "ip_clicks_1h", "ip_distinct_user_1h")
            }
    raise AssertionError(f"{click_id} was not freshly decided in this batch")


def sample(engine: DecisionEngine, name: str, **labels: str) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_batch_gets_the_model_s_verdicts_thresholds_and_reasons(
    engine: DecisionEngine, models: Models
) -> None:
    clicks = ClickBuilder()
    human, crawler = clicks.click(), clicks.click(user_agent=CRAWLER_AGENT, user_id="bot")
    result = engine.process([clicks.message(human), clicks.message(crawler)])
    out = decided(result)
    assert result.model_version == "v0001" and not result.dead_letters
    assert set(out) == {human["click_id"], crawler["click_id"]}
    assert out[human["click_id"]]["verdict"] == "valid"
    assert out[human["click_id"]]["reasons"] == []
    assert out[crawler["click_id"]]["verdict"] == "invalid"
    assert out[crawler["click_id"]]["reasons"] == ["known_crawler_ua", "model_score"]
    for click in (human, crawler):
        decision = out[click["click_id"]]
        assert decision["ts"] == click["ts"] and decision["model_version"] == "v0001"
        assert decision["threshold"] == 0.5 and 0.0 <= decision["score"] <= 1.0
        assert decision["degraded"] is False and decision["replay"] is False
        assert decision["late"] is False
    assert out[human["click_id"]]["slice"] == "desktop/logged_out"
    assert sample(engine, "slidr_clicks_in_total") == 2
    assert (
        sample(engine, "slidr_decisions_out_total", verdict="valid", slice="desktop/logged_out")
        == 1
    )


def test_a_redelivered_batch_gets_its_stored_decisions_and_counts_nothing_again(
    engine: DecisionEngine,
) -> None:
    clicks = ClickBuilder()
    batch = [clicks.message(), clicks.message()]
    first = engine.process(batch)
    again = engine.process(batch)  # the offsets were not committed: Kafka sends them again
    assert again.decisions == first.decisions  # byte for byte, decided_at included
    assert again.served_features == []  # nothing was featurized
    assert sample(engine, "slidr_redelivered_clicks_total") == 2
    assert (
        sample(engine, "slidr_decisions_out_total", verdict="valid", slice="desktop/logged_out")
        == 2
    )
    later = clicks.click()
    seen = counts_seen(engine.process([clicks.message(later)]), later["click_id"])
    assert seen["u_clicks_1h"] == 3  # the two clicks once each, then this one
    assert seen["ip_clicks_1h"] == 3  # the shared (Redis) counters too


def test_a_redelivered_click_beside_new_ones_keeps_its_decision(engine: DecisionEngine) -> None:
    clicks = ClickBuilder()
    old = clicks.message()
    (first,) = decided(engine.process([old])).values()
    new = clicks.click(user_agent=CRAWLER_AGENT)
    result = engine.process([old, clicks.message(new)])
    out = decided(result)
    assert out[first["click_id"]] == first
    assert out[new["click_id"]]["verdict"] == "invalid"
    assert counts_seen(result, new["click_id"])["u_clicks_1h"] == 2


def test_after_a_restart_redelivered_clicks_get_the_decisions_made_before(
    new_engine, models: Models
) -> None:
    shared = memory_shared_state()  # Redis outlives the worker
    clicks = ClickBuilder()
    batch = [
        clicks.message(clicks.click(user_id="u1"), partition=0),
        clicks.message(clicks.click(user_id="u2"), partition=1),
        clicks.message(clicks.click(user_id="u1"), partition=0),
    ]
    before = new_engine(models.v1, shared)
    first = before.process(batch)
    before.user_state.close()  # the worker stopped before committing its offsets
    after = new_engine(models.v1, shared)
    assert after.process(batch).decisions == first.decisions
    assert sample(after, "slidr_redelivered_clicks_total") == 3
    later = clicks.click(user_id="u1")
    seen = counts_seen(after.process([clicks.message(later)]), later["click_id"])
    assert seen == {"u_clicks_1h": 3, "ip_clicks_1h": 4, "ip_distinct_user_1h": 2}


def test_a_click_resent_after_midnight_with_a_new_ts_keeps_its_decision(
    engine: DecisionEngine,
) -> None:
    # START_TS is a midnight: the first copy is stamped a second before the next one,
    # the resend (a producer that stamps clicks as it sends them) a minute after it.
    clicks = ClickBuilder(start_ts=START_TS + 86_400 - 1.0)
    evening = clicks.click()
    (first,) = decided(engine.process([clicks.message(evening)])).values()
    resent = dict(evening, ts=START_TS + 86_400 + 60.0)
    later = clicks.click(ts=START_TS + 86_400 + 61.0)
    result = engine.process([clicks.message(resent), clicks.message(later)])
    assert decided(result)[evening["click_id"]] == first  # not decided again
    assert sample(engine, "slidr_redelivered_clicks_total") == 1
    assert counts_seen(result, later["click_id"])["u_clicks_1h"] == 1  # counted once


def test_a_click_repeated_within_a_batch_is_decided_once(engine: DecisionEngine) -> None:
    clicks = ClickBuilder()
    human, robot = clicks.click(), clicks.click(user_agent=CRAWLER_AGENT)
    # A producer retry can put the same click twice into one batch, even on another
    # partition; every copy gets the first copy's decision. The robot's copies come
    # first in the batch but it is decided after the human (event-time order).
    copies = [clicks.message(robot), clicks.message(robot), clicks.message(robot, partition=1)]
    result = engine.process([copies[0], clicks.message(human), *copies[1:]])
    keys = [key for key, _ in result.decisions]
    assert keys.count(robot["click_id"].encode()) == 3 and len(keys) == 4
    out = decided(result)  # also checks that every copy got the same decision
    assert out[robot["click_id"]]["verdict"] == "invalid"
    assert out[human["click_id"]]["verdict"] == "valid"
    assert len(result.served_features) == 2  # each click featurized once
    assert sample(engine, "slidr_redelivered_clicks_total") == 2
    decisions_out = sum(
        sample(engine, "slidr_decisions_out_total", verdict=verdict, slice=slice_name)
        for verdict, slice_name in (
            ("valid", "desktop/logged_out"),
            ("invalid", "other/logged_out"),
        )
    )
    assert decisions_out == 2
    assert counts_seen(result, robot["click_id"])["u_clicks_1h"] == 2
    # Stored once, as it was decided: a redelivery gets exactly that decision.
    again = decided(engine.process([clicks.message(robot)]))
    assert again[robot["click_id"]] == out[robot["click_id"]]


# (message value, what the dead letter's error must mention)
HOSTILE = {
    "not JSON": (b"click_id=c1&ts=1", r"json"),
    "invalid UTF-8": (b"\xff\xfe\x80{", r"json|utf"),
    "a JSON array": (b'[{"click_id": "c1"}]', r"object"),
    "no ip": ({"ip": MISSING}, r"\bip\b"),
    "ts not a time": ({"ts": "yesterday"}, r"\bts\b"),
    "ts before 1970": ({"ts": -5}, r"\bts\b"),
    "user_id a number": ({"user_id": 7}, r"user_id"),
    "control character in user_id": ({"user_id": "u\x1f1"}, r"user_id"),
    "logged_in a string": ({"logged_in": "yes"}, r"logged_in"),
    "context not an object": ({"context": ["publisher", "p1"]}, r"context"),
    "larger than an event may be": ({"user_agent": "x" * 70_000}, r"larger|bytes|user_agent"),
}


def test_bad_messages_become_dead_letters_and_the_batch_goes_on(engine: DecisionEngine) -> None:
    clicks = ClickBuilder()
    batch, expected = [clicks.message()], {}
    for name, (value, mention) in HOSTILE.items():
        message = clicks.message(clicks.click(**value) if isinstance(value, dict) else value)
        batch.append(message)
        expected[message.offset] = (name, message.value, mention)
        batch.append(clicks.message())  # a valid click after each bad one
    tombstone = clicks.tombstone()
    batch.append(tombstone)
    expected[tombstone.offset] = ("no value", None, r"empty|value")

    result = engine.process(batch)
    assert len(decided(result)) == len(HOSTILE) + 1  # every valid click
    assert len(result.dead_letters) == len(expected)
    for key, letter in result.dead_letters:
        assert key is None and len(letter) <= MAX_DEAD_LETTER_BYTES
        record = orjson.loads(letter)
        assert record["source"]["topic"] == "clicks" and record["source"]["partition"] == 0
        name, original, mention = expected.pop(record["source"]["offset"])
        assert re.search(mention, record["error"], re.IGNORECASE), (name, record["error"])
        assert record["original_bytes"] == len(original or b"")
    assert not expected  # one dead letter per bad message
    assert sample(engine, "slidr_dlq_total", topic="clicks") == len(HOSTILE) + 1


def test_dead_letters_leave_no_state_behind(engine: DecisionEngine) -> None:
    clicks = ClickBuilder()
    bad = [clicks.message(clicks.click(logged_in="yes")) for _ in range(3)]
    assert engine.process(bad).decisions == []  # no decision, no exception
    assert engine.process([]).decisions == []
    good = clicks.click()
    seen = counts_seen(engine.process([clicks.message(good)]), good["click_id"])
    assert seen["u_clicks_1h"] == 1 and seen["ip_clicks_1h"] == 1


def test_a_swap_applies_from_the_next_batch_and_stored_decisions_keep_their_version(
    engine: DecisionEngine, models: Models
) -> None:
    clicks = ClickBuilder()
    old = clicks.message()
    assert decided(engine.process([old]))["c000001"]["verdict"] == "valid"
    engine.swap_model(models.v2)
    assert engine.model.version == "v0001"  # a batch in progress is never switched
    desktop, mobile = clicks.click(), clicks.click(user_agent=MOBILE_AGENT)
    result = engine.process([clicks.message(desktop), clicks.message(mobile), old])
    out = decided(result)
    assert result.model_version == "v0002" and engine.model.version == "v0002"
    assert out[desktop["click_id"]]["model_version"] == "v0002"
    assert out[desktop["click_id"]]["verdict"] == "invalid"  # v2 flags it: 0.993 >= 0.5
    assert out[mobile["click_id"]]["slice"] == "mobile/logged_out"
    assert out[mobile["click_id"]]["threshold"] == 0.999  # v2's threshold for its slice
    assert out[mobile["click_id"]]["verdict"] == "valid"
    # A click decided before the swap is redelivered with the verdict it was billed on.
    assert out["c000001"]["model_version"] == "v0001" and out["c000001"]["verdict"] == "valid"
    assert sample(engine, "slidr_model_swaps_total") == 1
    assert sample(engine, "slidr_model_info", version="v0002") == 1
    assert (
        engine.metrics.registry.get_sample_value("slidr_model_info", {"version": "v0001"}) is None
    )


def test_of_several_swaps_before_a_batch_the_last_one_wins(
    engine: DecisionEngine, models: Models
) -> None:
    clicks = ClickBuilder()
    engine.swap_model(models.v2)
    engine.swap_model(models.v1)
    out = decided(engine.process([clicks.message()]))
    assert out["c000001"]["model_version"] == "v0001"
    assert out["c000001"]["verdict"] == "valid"
    assert sample(engine, "slidr_model_swaps_total") == 1


def test_without_redis_clicks_are_decided_and_marked_degraded(new_engine, models: Models) -> None:
    engine = new_engine(models.v1, ResilientStore(UnreachableStore()))
    clicks = ClickBuilder()
    result = engine.process(
        [clicks.message(), clicks.message(clicks.click(user_agent=CRAWLER_AGENT))]
    )
    out = decided(result)
    assert result.degraded and all(d["degraded"] for d in out.values())
    assert [d["verdict"] for d in out.values()] == ["valid", "invalid"]
    assert sample(engine, "slidr_degraded_decisions_total") == 2
    later = clicks.click()
    # The local fallback keeps counting the shared state while Redis is away.
    assert counts_seen(engine.process([clicks.message(later)]), later["click_id"]) == {
        "u_clicks_1h": 3,
        "ip_clicks_1h": 3,
        "ip_distinct_user_1h": 1,
    }


def test_a_late_click_is_decided_and_flagged(engine: DecisionEngine) -> None:
    clicks = ClickBuilder()
    now = clicks.click()
    late = clicks.click(click_id="late", ts=now["ts"] - DEFAULT_ALLOWED_LATENESS_S - 60)
    engine.process([clicks.message(now)])
    out = decided(engine.process([clicks.message(late)]))
    assert out["late"]["late"] is True and out["late"]["verdict"] == "valid"
    assert sample(engine, "slidr_late_clicks_total") == 1


# --- a batch that fails: bounded retries, then click by click --------------------------

CRAWLER_COLUMN = FEATURE_NAMES.index("ua_crawler")


class FailingScorer:
    """Wraps a model's scorer: fails the first ``transient`` calls, and every call whose
    rows include a declared crawler when ``crawlers_fail``."""

    def __init__(self, scorer, transient: int = 0, crawlers_fail: bool = False) -> None:
        self.scorer = scorer
        self.n_features = scorer.n_features
        self.transient = transient
        self.crawlers_fail = crawlers_fail
        self.calls = 0

    def score(self, matrix):
        self.calls += 1
        if self.calls <= self.transient:
            raise RuntimeError("scorer hiccup")
        if self.crawlers_fail and (matrix[:, CRAWLER_COLUMN] > 0).any():
            raise ValueError("input width 37, expected 38")
        return self.scorer.score(matrix)


def _with_scorer(model: ModelVersion, scorer) -> ModelVersion:
    return dataclasses.replace(model, scorer=scorer)


def test_a_batch_that_fails_once_is_retried_and_its_state_counted_once(
    new_engine, models: Models
) -> None:
    engine = new_engine(_with_scorer(models.v1, FailingScorer(models.v1.scorer, transient=1)))
    clicks = ClickBuilder()
    first, second = clicks.click(), clicks.click()
    result = engine.process([clicks.message(first), clicks.message(second)])
    assert set(decided(result)) == {first["click_id"], second["click_id"]}
    assert result.dead_letters == []
    # The failed attempt's folds were dropped: each click is counted once.
    assert counts_seen(result, second["click_id"])["u_clicks_1h"] == 2
    assert sample(engine, "slidr_batch_retries_total") == 1
    assert sample(engine, "slidr_batch_fallbacks_total") == 0
    later = clicks.click()
    seen = counts_seen(engine.process([clicks.message(later)]), later["click_id"])
    assert seen["u_clicks_1h"] == 3  # user state (RocksDB): the failed attempt left nothing
    # Shared counters had already taken the failed attempt, as they do before a crash.
    assert seen["ip_clicks_1h"] == 5


def test_a_batch_that_keeps_failing_is_decided_click_by_click(new_engine, models: Models) -> None:
    scorer = FailingScorer(models.v1.scorer, crawlers_fail=True)
    engine = new_engine(_with_scorer(models.v1, scorer))
    engine.batch_retries = 2
    clicks = ClickBuilder()
    human, crawler, other = (
        clicks.click(),
        clicks.click(user_agent=CRAWLER_AGENT),
        clicks.click(),
    )
    messages = [clicks.message(human), clicks.message(crawler), clicks.message(other)]
    result = engine.process(messages)
    assert set(decided(result)) == {human["click_id"], other["click_id"]}
    (letter,) = [orjson.loads(value) for _, value in result.dead_letters]
    assert "ValueError" in letter["error"] and "input width 37" in letter["error"]
    assert letter["source"]["offset"] == messages[1].offset
    assert orjson.loads(letter["original"])["click_id"] == crawler["click_id"]
    assert sample(engine, "slidr_batch_retries_total") == 2
    assert sample(engine, "slidr_batch_fallbacks_total") == 1
    assert sample(engine, "slidr_dlq_total", topic=messages[1].topic) == 1
    assert sample(engine, "slidr_clicks_in_total") == 3  # counted once, not per attempt
    assert scorer.calls == 3 + 3  # three attempts of the batch, then one per click
    # The decided clicks were stored: a redelivery gets the same decisions back.
    again = engine.process([messages[0], messages[2]])
    assert decided(again) == decided(result)


def test_a_failing_state_commit_dead_letters_the_batch_and_the_engine_goes_on(
    new_engine, models: Models, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = new_engine(models.v1)
    clicks = ClickBuilder()
    store = engine.user_state.store(0)

    def broken_commit(_decisions=()) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "commit", broken_commit)
    message = clicks.message()
    result = engine.process([message])
    assert result.decisions == []
    (letter,) = [orjson.loads(value) for _, value in result.dead_letters]
    assert "OSError" in letter["error"] and "disk full" in letter["error"]
    monkeypatch.undo()
    out = decided(engine.process([clicks.message()]))
    assert len(out) == 1  # the next batch is decided as usual


def test_a_read_only_redis_degrades_the_decisions_not_the_batch(new_engine, models: Models) -> None:
    """After a failover the old primary answers READONLY: a ResponseError, not a lost
    connection. Decisions are made with local counters and marked degraded."""
    refusing = RefusingRedis(redis.ResponseError("READONLY You can't write against a replica."))
    engine = new_engine(models.v1, ResilientStore(RedisStore(refusing)))  # type: ignore[arg-type]
    clicks = ClickBuilder()
    result = engine.process([clicks.message(), clicks.message()])
    out = decided(result)
    assert len(out) == 2 and result.dead_letters == []
    assert result.degraded and all(d["degraded"] for d in out.values())
    assert sample(engine, "slidr_batch_retries_total") == 0  # degraded, never failed
    assert sample(engine, "slidr_degraded_decisions_total") == 2
