"""Model switches: the registry changes and one control message tells the workers; a
worker's ``ControlFollower`` checks every message before it loads anything.

The follower's tests feed it control messages directly (``apply``) or through a fake
consumer; those marked by the ``settings`` fixture run on the embedded broker."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition

from events.settings import Settings
from features.definitions import N_FEATURES
from models.registry import GuardrailsNotPassed, ModelRegistry, RegistryError, StaleActiveError
from models.testing import register_logistic_model
from stream.control import (
    ControlFollower,
    control_end_offset,
    load_for_serving,
    promote,
    publish_control,
    rollback,
    settle_start,
)
from stream.kafka import CONTROL, consumer_config
from stream.testing import ClickBuilder, standalone_engine
from tests.models.test_registry import BAD_NAMES, width_onnx


def control_messages(settings: Settings) -> list[tuple[bytes, dict]]:
    """Everything on the test's control topic, oldest first, as (key, message)."""
    consumer = Consumer(consumer_config(settings, group_id=f"control-test-{time.time_ns()}"))
    topic = settings.topic(CONTROL)
    _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
    consumer.assign([TopicPartition(topic, 0, 0)])
    out: list[tuple[bytes, dict]] = []
    deadline = time.monotonic() + 10
    try:
        while len(out) < high and time.monotonic() < deadline:
            for message in consumer.consume(10, 0.2):
                assert message.error() is None, message.error()
                out.append((message.key(), orjson.loads(message.value())))
    finally:
        consumer.close()
    return out


@pytest.fixture
def settings(stream_settings: Settings, tmp_path: Path) -> Settings:
    """The test's topics and a registry with v0001 (active) and v0002."""
    registry = ModelRegistry(tmp_path / "registry")
    register_logistic_model(registry, {"ua_crawler": 10.0}, bias=-5.0)
    register_logistic_model(registry, {}, bias=5.0)
    return stream_settings.replace(registry=registry.root)


def test_promote_then_rollback_switch_the_registry_and_tell_the_workers(
    settings: Settings,
) -> None:
    registry = ModelRegistry(settings.registry)
    before = time.time()
    promoted = promote(settings, "v0002", reason="better on Monday")
    assert registry.active_version() == "v0002"
    rolled = rollback(settings, reason="worse on Tuesday")
    assert registry.active_version() == "v0001"
    assert registry.stable_versions() == ["v0001"]  # the version rolled back from leaves
    assert (promoted["action"], promoted["model_version"]) == ("activate", "v0002")
    assert (rolled["action"], rolled["model_version"]) == ("rollback", "v0001")
    assert control_messages(settings) == [(b"model", promoted), (b"model", rolled)]
    for message in (promoted, rolled):
        assert set(message) == {"action", "model_version", "reason", "at"}  # SPEC §1
        assert before <= message["at"] <= time.time()
    assert rolled["reason"] == "worse on Tuesday"


def test_a_version_the_registry_does_not_hold_is_never_announced(settings: Settings) -> None:
    with pytest.raises(RegistryError, match="no version 'v0042'"):
        promote(settings, "v0042")
    with pytest.raises(RegistryError, match="no version 'v0042'"):
        rollback(settings, to="v0042")
    with pytest.raises(RegistryError, match="no stable version to roll back to"):
        rollback(settings)  # v0001 is the only stable version
    assert ModelRegistry(settings.registry).active_version() == "v0001"
    assert control_messages(settings) == []


def test_publish_control_waits_for_the_broker(settings: Settings) -> None:
    message = publish_control(settings, "activate", "v0001", "re-announce")
    assert control_messages(settings) == [(b"model", message)]


def test_a_version_whose_guardrails_failed_is_announced_only_when_forced(
    settings: Settings,
) -> None:
    registry = ModelRegistry(settings.registry)
    rejected = register_logistic_model(registry, {}, bias=0.0, guardrails_passed=False)
    with pytest.raises(GuardrailsNotPassed, match=rf"{rejected} .*written_for_tests.*--force"):
        promote(settings, rejected)
    assert control_messages(settings) == []
    message = promote(settings, rejected, reason="incident 42", force=True)
    assert message["model_version"] == rejected
    assert message["reason"].startswith("incident 42 [forced: guardrails failed: written_for")
    assert registry.active_record().forced
    assert control_messages(settings) == [(b"model", message)]


def test_a_rollback_decided_on_a_stale_record_changes_nothing(settings: Settings) -> None:
    registry = ModelRegistry(settings.registry)
    judged = registry.active_record()  # the monitor judges v0001 ...
    promote(settings, "v0002", reason="retrain")  # ... while a retrain promotes
    with pytest.raises(StaleActiveError, match="expected v0001, found v0002"):
        rollback(settings, reason="monitor", expected_active=judged.version)
    assert registry.active_version() == "v0002"
    assert [m["model_version"] for _, m in control_messages(settings)] == ["v0002"]


def test_a_promotion_while_the_worker_starts_reaches_its_follower(settings: Settings) -> None:
    """The end of the topic is read before the model is settled: a promotion published
    after that read is on the topic after the follower's start."""
    registry = ModelRegistry(settings.registry)
    loaded = load_for_serving(registry)
    assert loaded.version == "v0001"

    def end_then_promotion() -> int | None:
        end = control_end_offset(settings)
        promote(settings, "v0002", reason="while the worker starts")
        return end

    model, start = settle_start(registry, loaded, None, end_then_promotion)
    assert start is not None
    # The registry already says v0002, so the worker starts on it ...
    assert model.version == "v0002"
    engine = standalone_engine(registry.load("v0001", prefer_gpu=False), settings.home / "s")
    follower = ControlFollower(settings, registry, engine, start_offset=start)
    follower.start()
    try:
        # ... and had it loaded v0001 first, its follower would still meet the message.
        deadline = time.monotonic() + 20
        while follower.pending_version != "v0002" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert follower.pending_version == "v0002"
        assert follower.position == start + 1
    finally:
        follower.stop_event.set()
        follower.join(10)
        engine.user_state.close()


# -- the follower, fed directly: no broker ----------------------------------------------


class Follower:
    """A registry with v0001 (active), v0002 and v0003 (guardrails passed), v0004 (its
    guardrails failed) and v0005 (a model of another input width), and a standalone
    engine on v0001 followed by a ``ControlFollower`` without a broker."""

    def __init__(self, root: Path, pinned: str | None = None) -> None:
        self.registry = ModelRegistry(root / "registry")
        register_logistic_model(self.registry, {"ua_crawler": 10.0}, bias=-5.0)
        register_logistic_model(self.registry, {}, bias=5.0)
        register_logistic_model(self.registry, {}, bias=-5.0)
        register_logistic_model(self.registry, {}, bias=0.0, guardrails_passed=False)
        register_logistic_model(self.registry, {}, bias=0.0)
        (self.registry.path_of("v0005") / "model.onnx").chmod(0o600)
        (self.registry.path_of("v0005") / "model.onnx").write_bytes(width_onnx(N_FEATURES - 1))
        self.engine = standalone_engine(self.registry.load("v0001", prefer_gpu=False), root / "s")
        self.follower = ControlFollower(Settings(), self.registry, self.engine, pinned=pinned)
        self.clicks = ClickBuilder()

    def decide(self) -> str:
        """Decide one click; the version that decided it."""
        return self.engine.process([self.clicks.message()]).model_version

    def refused(self, reason: str) -> float:
        sample = self.engine.metrics.registry.get_sample_value(
            "slidr_control_refused_total", {"reason": reason}
        )
        return sample or 0.0


def control(version: object, action: str = "activate", reason: str = "test") -> bytes:
    return orjson.dumps(
        {"action": action, "model_version": version, "reason": reason, "at": time.time()}
    )


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Follower]:
    built = Follower(tmp_path)
    yield built
    built.engine.user_state.close()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_the_follower_refuses_a_name_that_is_not_a_version(
    world: Follower, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A real version's files outside the registry, where a path-like name would lead.
    shutil.copytree(world.registry.path_of("v0002"), tmp_path / "x")
    monkeypatch.setattr(world.registry, "load", lambda *_a, **_k: pytest.fail("loaded"))
    assert world.follower.apply(control(name)) is False
    assert world.follower.apply(control(str(tmp_path / "x"))) is False
    # The contract already refuses an empty name; every other one fails the name check.
    assert world.refused("version_name") + world.refused("malformed") == 2
    assert world.refused("version_name") >= 1
    assert world.decide() == "v0001"


def test_the_follower_refuses_malformed_and_unknown_versions(world: Follower) -> None:
    for raw in (b"not json", orjson.dumps({"action": "activate"}), None):
        assert world.follower.apply(raw) is False
    assert world.refused("malformed") == 3
    assert world.follower.apply(control("v0042")) is False
    assert world.refused("unknown_version") == 1
    assert world.decide() == "v0001"


def test_the_follower_switches_between_batches(world: Follower) -> None:
    assert world.decide() == "v0001"
    assert world.follower.apply(control("v0002")) is True
    assert world.follower.pending_version == "v0002"
    assert world.decide() == "v0002"
    assert world.follower.apply(control("v0002", reason="re-announced")) is False  # no reload
    assert world.decide() == "v0002"


def test_promote_then_rollback_before_the_next_batch_ends_on_the_rollback(
    world: Follower,
) -> None:
    assert world.follower.apply(control("v0002", "activate")) is True
    assert world.follower.apply(control("v0001", "rollback")) is True
    assert world.decide() == "v0001", "the rollback's version, not the promotion's"
    # The same with a third version in between.
    world.follower.apply(control("v0002", "activate"))
    world.follower.apply(control("v0003", "activate"))
    world.follower.apply(control("v0002", "rollback"))
    assert world.decide() == "v0002"


def test_the_follower_refuses_a_version_whose_guardrails_failed(
    world: Follower, caplog: pytest.LogCaptureFixture
) -> None:
    assert world.follower.apply(control("v0004")) is False
    assert world.refused("guardrails") == 1
    assert "v0004 did not pass its guardrails" in caplog.text
    assert world.decide() == "v0001"
    # Forced in the registry (slidr promote --force), the same message is followed.
    world.registry.activate("v0004", force=True)
    assert world.follower.apply(control("v0004", reason="x [forced: ...]")) is True
    assert world.decide() == "v0004"


def test_the_follower_refuses_a_model_of_another_input_width(
    world: Follower, caplog: pytest.LogCaptureFixture
) -> None:
    assert world.follower.apply(control("v0005")) is False
    assert world.refused("input_width") == 1
    assert f"v0005 takes {N_FEATURES - 1} features per click" in caplog.text
    assert "staying on v0001" in caplog.text
    assert world.decide() == "v0001", "the current model stays"


def test_the_follower_refuses_a_model_of_another_feature_spec(
    world: Follower, caplog: pytest.LogCaptureFixture
) -> None:
    # The same width as this build's vector, other values: refused like another width.
    older = register_logistic_model(world.registry, {}, bias=5.0)
    manifest_path = world.registry.path_of(older) / "manifest.json"
    manifest = orjson.loads(manifest_path.read_bytes())
    manifest_path.chmod(0o600)
    manifest_path.write_bytes(orjson.dumps({**manifest, "feature_spec_version": "f1"}))
    assert world.follower.apply(control(older)) is False
    assert world.refused("input_width") == 1
    assert f"{older} was trained on feature spec f1" in caplog.text
    assert world.decide() == "v0001", "the current model stays"


def test_a_pinned_follower_ignores_control_messages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pinned = Follower(tmp_path, pinned="v0001")
    try:
        assert pinned.follower.apply(control("v0002")) is False
        assert pinned.follower.catch_up_with_registry() is False
        assert pinned.refused("pinned") == 1
        assert "ignored activate 'v0002'" in caplog.text
        assert "pinned to v0001" in caplog.text
        assert pinned.decide() == "v0001"
    finally:
        pinned.engine.user_state.close()


def test_settle_start_reads_the_topic_end_before_the_active_version(world: Follower) -> None:
    registry = world.registry
    loaded = registry.load("v0001", prefer_gpu=False)
    order: list[str] = []

    def end_while_a_promotion_lands() -> int:
        order.append("end read")
        registry.activate("v0002")  # published just after the end was read
        return 7

    model, start = settle_start(registry, loaded, None, end_while_a_promotion_lands)
    assert (model.version, start) == ("v0002", 7)
    model, start = settle_start(registry, loaded, "v0001", lambda: 9)
    assert (model.version, start) == ("v0001", 9), "a pinned worker keeps its version"


# -- the follower's consumer: where it starts, and broker errors -------------------------


class FakeError:
    def __init__(self, fatal: bool = False) -> None:
        self._fatal = fatal

    def fatal(self) -> bool:
        return self._fatal

    def __str__(self) -> str:
        return "fatal broker error" if self._fatal else "all brokers down"


class FakeMessage:
    def __init__(self, offset: int, value: bytes | None = None, error: FakeError | None = None):
        self._offset, self._value, self._error = offset, value, error

    def error(self) -> FakeError | None:
        return self._error

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value


class FakeBroker:
    """Hands out consumers that replay a script: per consumer, a list of poll results
    (a message, None, or an exception to raise); ``end`` is the topic's end offset."""

    def __init__(self, scripts: list[list], end: int = 0, fail_creations: int = 0) -> None:
        self.scripts = scripts
        self.end = end
        self.fail_creations = fail_creations
        self.assigned: list[int] = []
        self.closed = 0
        self.done = threading.Event()

    def consumer(self) -> FakeBroker.Consumer:
        if self.fail_creations:
            self.fail_creations -= 1
            raise KafkaException("cannot reach the broker")
        return FakeBroker.Consumer(self, self.scripts.pop(0) if self.scripts else [])

    class Consumer:
        def __init__(self, broker: FakeBroker, script: list) -> None:
            self.broker, self.script = broker, script

        def get_watermark_offsets(self, partition, timeout):  # noqa: ANN001
            return 0, self.broker.end

        def assign(self, partitions) -> None:  # noqa: ANN001
            self.broker.assigned.append(partitions[0].offset)

        def poll(self, timeout):  # noqa: ANN001
            if not self.script:
                self.broker.done.set()
                time.sleep(0.01)
                return None
            item = self.script.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item

        def close(self) -> None:
            self.broker.closed += 1


def run_follower(world: Follower, broker: FakeBroker, **kwargs) -> ControlFollower:
    follower = ControlFollower(
        Settings(), world.registry, world.engine, consumer_factory=broker.consumer, **kwargs
    )
    follower.start()
    try:
        assert broker.done.wait(10), "the follower did not reach the end of its script"
        assert follower.is_alive(), "the follower must never stop while the worker runs"
    finally:
        follower.stop_event.set()
        follower.join(10)
    return follower


def test_the_follower_starts_where_the_loaded_model_was_decided(world: Follower) -> None:
    broker = FakeBroker([[FakeMessage(5, control("v0002"))]], end=99)
    follower = run_follower(world, broker, start_offset=5)
    assert broker.assigned == [5], "from the given position, not the topic's end"
    assert follower.pending_version == "v0002" and follower.position == 6


def test_without_a_start_position_the_follower_catches_up_with_the_registry(
    world: Follower,
) -> None:
    world.registry.activate("v0003")  # a switch the worker may have missed
    broker = FakeBroker([[]], end=12)
    follower = run_follower(world, broker)
    assert broker.assigned == [12]
    assert follower.pending_version == "v0003"
    assert world.decide() == "v0003"


def test_the_follower_survives_broker_errors(
    world: Follower, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("stream.control.RETRY_FIRST_S", 0.01)
    broker = FakeBroker(
        [
            # Transport errors, a message, then a fatal error: a new consumer follows on.
            [
                FakeMessage(-1, error=FakeError()),
                FakeMessage(3, control("v0002")),
                FakeMessage(-1, error=FakeError(fatal=True)),
            ],
            [KafkaException("poll failed")],
            [FakeMessage(4, control("v0001", "rollback"))],
        ],
        fail_creations=2,
    )
    follower = run_follower(world, broker, start_offset=3)
    assert broker.assigned == [3, 4, 4], "every new consumer resumes where the last stopped"
    assert follower.pending_version == "v0001" and follower.position == 5
    errors = world.engine.metrics.registry.get_sample_value("slidr_control_errors_total")
    assert errors == 5  # 2 failed creations, 1 transport error, 1 fatal, 1 raised by poll
    assert broker.closed == 3
