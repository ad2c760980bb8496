"""Model switches: the registry says which version is active, ``slidr.control`` tells
the running workers (SPEC §1; the message is declared in ``events.declarations``)."""

from __future__ import annotations

import time

import orjson
from confluent_kafka import Producer

from events.declarations import CONTROL as CONTROL_MESSAGE
from events.settings import Settings
from models.registry import ModelRegistry
from stream.kafka import CONTROL, BrokerUnavailable, ensure_topics, producer_config


def publish_control(settings: Settings, action: str, version: str, reason: str) -> dict:
    """Publish one control message and wait for the broker's acknowledgement."""
    message = CONTROL_MESSAGE.build(
        action=action, model_version=version, reason=reason, at=time.time()
    )
    ensure_topics(settings, names=(CONTROL,))
    producer = Producer(producer_config(settings))
    errors: list[str] = []
    producer.produce(
        settings.topic(CONTROL),
        key=b"model",
        value=orjson.dumps(message),
        on_delivery=lambda err, _m: errors.append(str(err)) if err else None,
    )
    if producer.flush(15) or errors:
        raise BrokerUnavailable(
            f"control message not delivered: {errors or 'timeout'}; the registry already "
            f"has {version} active: check the broker, then `slidr promote {version}` to tell "
            "the running workers"
        )
    return message


def promote(settings: Settings, version: str, reason: str = "promoted") -> dict:
    """Activate ``version`` in the registry and tell the workers."""
    ModelRegistry(settings.registry).activate(version, reason)
    return publish_control(settings, "activate", version, reason)


def rollback(settings: Settings, to: str | None = None, reason: str = "manual rollback") -> dict:
    """Return to ``to`` (default: the newest stable version before the active one)."""
    event = ModelRegistry(settings.registry).rollback(to, reason)
    return publish_control(settings, "rollback", event["version"], reason)
