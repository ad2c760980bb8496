"""Model switches: the registry changes and one control message tells the workers."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from events.settings import Settings
from models.registry import ModelRegistry, RegistryError
from models.testing import register_logistic_model
from stream.control import promote, publish_control, rollback
from stream.kafka import CONTROL, consumer_config


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
