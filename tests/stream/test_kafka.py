"""confluent-kafka plumbing: config builders, topic creation, and a round trip through Tansu."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from events.settings import Settings, SettingsError
from stream.kafka import (
    CONTROL,
    TOPICS,
    BrokerUnavailable,
    admin_config,
    consumer_config,
    ensure_topics,
    producer_config,
    redacted,
    topic_spec,
    wait_for_broker,
)
from stream.local_stack import StackNotRunning, free_port

LOCAL = Settings(kafka_bootstrap="127.0.0.1:9092", redis_url="redis://127.0.0.1:6379/0")


# -- config builders (no broker) --------------------------------------------------------


def test_producer_config_follows_settings() -> None:
    config = producer_config(LOCAL.replace(linger_ms=7))
    assert config["bootstrap.servers"] == "127.0.0.1:9092"
    assert config["linger.ms"] == 7
    assert config["enable.idempotence"] is False
    assert config["acks"] == "all"
    assert producer_config(LOCAL.replace(producer_idempotence=True))["enable.idempotence"] is True
    assert config["allow.auto.create.topics"] is False
    assert config["security.protocol"] == "PLAINTEXT"
    assert not any(key.startswith(("sasl.", "ssl.")) for key in config)


def test_consumer_config_is_tuned_for_tansu() -> None:
    config = consumer_config(LOCAL.replace(session_timeout_ms=6000, fetch_wait_ms=20), "g1")
    assert config["group.id"] == "g1"
    assert config["session.timeout.ms"] == 6000
    assert config["heartbeat.interval.ms"] == 2000
    assert config["fetch.wait.max.ms"] == 20
    assert config["enable.auto.commit"] is False
    assert config["auto.offset.reset"] == "earliest"


def test_overrides_take_underscores_dots_and_none() -> None:
    def on_error(_err: object) -> None: ...

    config = producer_config(
        LOCAL,
        linger_ms=0,
        enable_idempotence=None,
        error_cb=on_error,
        log_level=3,
        **{"batch.size": 1000},
    )
    assert config["linger.ms"] == 0
    assert "enable.idempotence" not in config
    assert config["error_cb"] is on_error  # keys that really have underscores keep them
    assert config["log_level"] == 3
    assert config["batch.size"] == 1000
    assert consumer_config(LOCAL, "g", auto_offset_reset="latest")["auto.offset.reset"] == "latest"


def test_sasl_and_tls_settings_reach_every_client() -> None:
    settings = LOCAL.replace(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="slidr",
        kafka_sasl_password="s3cret",
        kafka_ssl_cafile="/etc/ssl/kafka-ca.pem",
    )
    expected = {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "slidr",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ssl/kafka-ca.pem",
    }
    for config in (
        producer_config(settings),
        consumer_config(settings, "g"),
        admin_config(settings),
    ):
        assert expected.items() <= config.items()
    assert redacted(producer_config(settings))["sasl.password"] == "***"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kafka_sasl_mechanism": "PLAIN"}, "SLIDR_KAFKA_SASL_MECHANISM set but"),
        ({"kafka_security_protocol": "SASL_SSL"}, "SLIDR_KAFKA_SASL_MECHANISM must be set"),
        (
            {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "PLAIN"},
            "needs SLIDR_KAFKA_SASL_USERNAME",
        ),
        ({"kafka_ssl_cafile": "/ca.pem"}, "SLIDR_KAFKA_SSL_CAFILE set but"),
    ],
)
def test_security_settings_that_would_not_authenticate_fail_fast(
    changes: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        producer_config(LOCAL.replace(**changes))


def test_without_bootstrap_or_stack_the_error_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StackNotRunning, match="SLIDR_KAFKA_BOOTSTRAP"):
        consumer_config(Settings(home=tmp_path), "g")


def test_topic_specs() -> None:
    settings = LOCAL.replace(partitions=8, topic_prefix="x-")
    clicks = topic_spec(settings, "clicks")
    assert (clicks.topic, clicks.num_partitions) == ("x-clicks", 8)
    assert topic_spec(settings, "clicks", partitions=3).num_partitions == 3
    control = topic_spec(settings, CONTROL, partitions=3)
    assert (control.topic, control.num_partitions) == ("x-slidr.control", 1)
    assert control.config == {"cleanup.policy": "compact"}


def test_wait_for_broker_times_out_with_the_address() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=address):
        wait_for_broker(LOCAL.replace(kafka_bootstrap=address), timeout=0.5)
    assert time.monotonic() - started < 3


# -- against the embedded broker ----------------------------------------------------------


def test_wait_for_broker_returns_the_stack_metadata(stack) -> None:
    assert wait_for_broker(stack.settings, timeout=5).cluster_id == stack.cluster_id


def test_ensure_topics_creates_once(stack) -> None:
    settings = stack.settings.replace(topic_prefix=f"e{uuid.uuid4().hex[:8]}-", partitions=3)
    created = ensure_topics(settings)
    assert sorted(created) == sorted(settings.topic(name) for name in TOPICS)
    assert ensure_topics(settings) == []  # idempotent

    admin = AdminClient(admin_config(settings))
    topics = admin.list_topics(timeout=5).topics
    for name in TOPICS:
        wanted = 1 if name == CONTROL else 3
        assert len(topics[settings.topic(name)].partitions) == wanted, name
    control = ConfigResource("topic", settings.topic(CONTROL))
    configs = admin.describe_configs([control])[control].result()
    assert configs["cleanup.policy"].value == "compact"

    assert ensure_topics(settings, ["extra"], partitions=2) == [settings.topic("extra")]
    assert len(admin.list_topics(timeout=5).topics[settings.topic("extra")].partitions) == 2


def test_metadata_requests_do_not_create_topics(stack) -> None:
    # Tansu creates any topic a metadata request names, unless the client opts out.
    settings = stack.settings.replace(topic_prefix=f"n{uuid.uuid4().hex[:8]}-")
    admin = AdminClient(admin_config(settings))
    admin.list_topics(topic=settings.topic("never-created"), timeout=5)
    assert settings.topic("never-created") not in admin.list_topics(timeout=5).topics


def test_produce_consume_round_trip(stream_settings: Settings) -> None:
    topic = stream_settings.topic("clicks")
    producer = Producer(producer_config(stream_settings))
    sent = {f"user-{i}": f"click-{i}".encode() for i in range(50)}
    for key, value in sent.items():
        producer.produce(topic, key=key, value=value)
    assert producer.flush(10) == 0

    consumer = Consumer(consumer_config(stream_settings, f"g-{uuid.uuid4().hex[:8]}"))
    joined: list[float] = []
    started = time.monotonic()
    consumer.subscribe([topic], on_assign=lambda *_: joined.append(time.monotonic() - started))
    received: dict[str, bytes] = {}
    try:
        while len(received) < len(sent) and time.monotonic() - started < 20:
            for message in consumer.consume(100, 0.1):
                assert message.error() is None, message.error()
                received[message.key().decode()] = message.value()
        assert received == sent
        # Tansu holds a join for half the session timeout (3 s at 6000 ms).
        assert joined and joined[0] < stream_settings.session_timeout_ms / 1000
        consumer.commit(asynchronous=False)

        # With the group in place, a new record arrives within a few fetch waits.
        sent_at = time.monotonic()
        producer.produce(topic, key="late", value=b"late")
        producer.flush(5)
        message = None
        while message is None and time.monotonic() - sent_at < 5:
            message = consumer.poll(0.1)
        assert message is not None and message.value() == b"late"
        assert time.monotonic() - sent_at < 1.0
    finally:
        consumer.close()


def test_a_restarted_consumer_resumes_after_its_commit(stream_settings: Settings) -> None:
    settings = stream_settings.replace(session_timeout_ms=2000)  # 1 s joins keep this quick
    topic = settings.topic("decisions")
    group = f"g-{uuid.uuid4().hex[:8]}"
    producer = Producer(producer_config(settings))

    def drain(expected: int) -> list[bytes]:
        consumer = Consumer(consumer_config(settings, group))
        consumer.subscribe([topic])
        values: list[bytes] = []
        deadline = time.monotonic() + 15
        try:
            while len(values) < expected and time.monotonic() < deadline:
                values += [m.value() for m in consumer.consume(100, 0.1) if m.error() is None]
            consumer.commit(asynchronous=False)
        finally:
            consumer.close()
        return values

    for i in range(5):
        producer.produce(topic, key="k", value=f"a{i}".encode())
    producer.flush(5)
    assert drain(5) == [f"a{i}".encode() for i in range(5)]
    for i in range(3):
        producer.produce(topic, key="k", value=f"b{i}".encode())
    producer.flush(5)
    assert drain(3) == [f"b{i}".encode() for i in range(3)]
