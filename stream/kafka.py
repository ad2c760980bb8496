"""confluent-kafka plumbing: client configs from Settings, topic creation, broker wait.

Every producer, consumer and admin client in slidr is configured here, so security
settings and the tuning below apply everywhere. The defaults suit Tansu (the embedded
broker; see FINDINGS.md) and are harmless on a real Kafka cluster:

- Tansu holds a group join until half the session timeout has passed, so the consumer
  session timeout comes from ``SLIDR_SESSION_TIMEOUT_MS`` (6000 by default).
  Measured with ``consumer_config`` on Tansu 0.6.0: subscribe to first assignment
  3.0 s at 6000 ms (2.0 s at 3000, 1.0 s at 2000); the wait repeats at every rebalance.
- Tansu does not wake a long poll when data arrives, so ``fetch.wait.max.ms`` is short
  (``SLIDR_FETCH_WAIT_MS``, 20 by default). Measured produce -> consume round trip with
  linger 10 ms / fetch wait 20 ms, read as messages arrive (``stream.topics.arrived_now``):
  a steady 2,000 msg/s for 30 s p50 15 ms, p99 31-33 ms, rising as the broker stores more
  batches (FINDINGS.md). The same rate was p50 12-13 ms, p99 22-23 ms in its first 5 s.
  A longer linger means fewer batches and a flatter tail (``Settings.linger_ms``).
- Tansu creates any topic named in a metadata request or produce, with 4 partitions and
  no config. Clients here do not ask for auto-creation: topics come from
  ``ensure_topics`` only, so ``slidr.control`` keeps one partition and compaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from events.errors import SlidrError
from events.settings import SettingsError
from stream.local_stack import resolve_bootstrap

if TYPE_CHECKING:
    from events.settings import Settings

log = logging.getLogger(__name__)

# Logical topic names; the full name is ``settings.topic(name)`` (adds the prefix).
CLICKS = "clicks"
PURCHASES = "purchases"
DECISIONS = "decisions"
CLICKS_DLQ = "clicks.dlq"
CONTROL = "slidr.control"
FEATURES_SERVED = "features.served"
TOPICS = (CLICKS, PURCHASES, DECISIONS, CLICKS_DLQ, CONTROL, FEATURES_SERVED)

# The control topic is a single ordered log of activations and rollbacks: one partition
# keeps them in order, compaction keeps the latest per key. (Tansu's memory engine
# stores cleanup.policy but never compacts; a real cluster does.)
SINGLE_PARTITION_TOPICS = frozenset({CONTROL})
TOPIC_CONFIGS: dict[str, dict[str, str]] = {CONTROL: {"cleanup.policy": "compact"}}
# Each consumer group logs its user state to a topic of its own, partitioned like
# ``clicks`` and compacted (the latest record per user or click): ``stream.changelog``.
STATE_CHANGELOG_SUFFIX = ".state.changelog"


def state_changelog(group_id: str) -> str:
    """Logical name of consumer group ``group_id``'s state changelog topic."""
    return f"{group_id}{STATE_CHANGELOG_SUFFIX}"


CLIENT_ID = "slidr"
SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
TLS_PROTOCOLS = ("SSL", "SASL_SSL")
# Config keys that really contain underscores: confluent-kafka's Python-side options and
# librdkafka's log_level. Any other override written with underscores (``linger_ms``)
# is the librdkafka property written with dots (``linger.ms``).
_UNDERSCORE_KEYS = frozenset(
    {"error_cb", "throttle_cb", "stats_cb", "oauth_cb", "on_delivery", "on_commit", "logger"}
    | {"log_level"}
)
_SECRET_KEYS = frozenset({"sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret"})


class BrokerUnavailable(SlidrError, RuntimeError):
    """The Kafka broker did not answer in time; the message names the address."""


# -- client configs -------------------------------------------------------------------


def client_config(settings: Settings) -> dict[str, Any]:
    """What every client needs: bootstrap address, security, no topic auto-creation."""
    config: dict[str, Any] = {
        "bootstrap.servers": resolve_bootstrap(settings),
        "client.id": CLIENT_ID,
        # Tansu auto-creates topics named in metadata requests (even by an admin client
        # listing one topic) with 4 partitions and no config: never ask it to.
        "allow.auto.create.topics": False,
    }
    config.update(security_config(settings))
    return config


def security_config(settings: Settings) -> dict[str, Any]:
    """``security.protocol`` and the SASL/TLS properties the settings call for.

    Raises ``SettingsError`` for combinations that would silently not authenticate,
    e.g. a SASL mechanism with a PLAINTEXT protocol.
    """
    protocol = settings.kafka_security_protocol.upper()
    config: dict[str, Any] = {"security.protocol": protocol}
    sasl_given = [
        name
        for name, value in (
            ("SLIDR_KAFKA_SASL_MECHANISM", settings.kafka_sasl_mechanism),
            ("SLIDR_KAFKA_SASL_USERNAME", settings.kafka_sasl_username),
            ("SLIDR_KAFKA_SASL_PASSWORD", settings.kafka_sasl_password),
        )
        if value
    ]
    if protocol in SASL_PROTOCOLS:
        if not settings.kafka_sasl_mechanism:
            raise SettingsError(
                f"SLIDR_KAFKA_SASL_MECHANISM must be set when SLIDR_KAFKA_SECURITY_PROTOCOL "
                f"is {protocol} (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
            )
        mechanism = settings.kafka_sasl_mechanism.upper()
        config["sasl.mechanism"] = mechanism
        if mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and not (
            settings.kafka_sasl_username and settings.kafka_sasl_password
        ):
            raise SettingsError(
                f"SASL {mechanism} needs SLIDR_KAFKA_SASL_USERNAME and SLIDR_KAFKA_SASL_PASSWORD"
            )
        if settings.kafka_sasl_username:
            config["sasl.username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password:
            config["sasl.password"] = settings.kafka_sasl_password
    elif sasl_given:
        raise SettingsError(
            f"{', '.join(sasl_given)} set but SLIDR_KAFKA_SECURITY_PROTOCOL is {protocol}: "
            "use SASL_SSL (or SASL_PLAINTEXT)"
        )
    if settings.kafka_ssl_cafile:
        if protocol not in TLS_PROTOCOLS:
            raise SettingsError(
                f"SLIDR_KAFKA_SSL_CAFILE set but SLIDR_KAFKA_SECURITY_PROTOCOL is {protocol}: "
                "use SSL or SASL_SSL"
            )
        config["ssl.ca.location"] = str(settings.kafka_ssl_cafile)
    return config


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Config for a ``confluent_kafka.Producer``.

    Overrides take librdkafka names, with dots (``**{"linger.ms": 0}``) or underscores
    (``linger_ms=0``); a None value removes the key.
    """
    config = client_config(settings)
    config.update(
        {
            "linger.ms": settings.linger_ms,
            # Off by default: on Tansu the idempotent producer put a ~0.5 s tail on
            # deliveries (bare produce->consume at 2,000/s: p99 360 ms with it, 71 ms
            # without, acks=all both). Decisions are idempotent by click_id, so retries'
            # duplicates are harmless; turn it on for a real Kafka (SLIDR_PRODUCER_IDEMPOTENCE).
            "enable.idempotence": settings.producer_idempotence,
            "acks": "all",
        }
    )
    return _apply_overrides(config, overrides)


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Config for a ``confluent_kafka.Consumer`` in group ``group_id``.

    Offsets are committed by the caller after its decisions are produced (at least
    once), so auto-commit is off. A new group starts at the earliest offset: every
    click must get a decision. Overrides as in ``producer_config``.
    """
    session_ms = settings.session_timeout_ms
    config = client_config(settings)
    config.update(
        {
            "group.id": group_id,
            # Tansu holds joins for half the session timeout: a short session makes
            # joins and rebalances fast (6000 ms -> 3.0 s to assignment, measured).
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(100, session_ms // 3),
            # Tansu never wakes a long poll on new data: latency ~ the fetch wait.
            "fetch.wait.max.ms": settings.fetch_wait_ms,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    return _apply_overrides(config, overrides)


def admin_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Config for a ``confluent_kafka.admin.AdminClient``."""
    return _apply_overrides(client_config(settings), overrides)


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a client config safe to print or log (secrets masked)."""
    return {k: ("***" if k in _SECRET_KEYS and v else v) for k, v in config.items()}


def _apply_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        name = key if "." in key or key in _UNDERSCORE_KEYS else key.replace("_", ".")
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
    return config


# -- broker and topics ----------------------------------------------------------------


def wait_for_broker(settings: Settings, timeout: float = 30.0) -> ClusterMetadata:
    """Block until the broker answers a metadata request; return the metadata.

    ``timeout`` is in seconds. Raises ``BrokerUnavailable`` naming the address.
    """
    bootstrap = resolve_bootstrap(settings)
    # log_level 0: "connection refused" while waiting is expected; the last error is
    # reported in the exception instead of spamming stderr every 50 ms.
    admin = AdminClient(admin_config(settings, log_level=0))
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while True:
        remaining = deadline - time.monotonic()
        try:
            return admin.list_topics(timeout=max(0.1, min(1.0, remaining)))
        except KafkaException as exc:
            last_error = exc.args[0].str()
        if time.monotonic() >= deadline:
            raise BrokerUnavailable(
                f"Kafka broker at {bootstrap} did not answer within {timeout:g} s "
                f"({last_error}): run `slidr up`, or check SLIDR_KAFKA_BOOTSTRAP"
            )
        time.sleep(0.1)


def topic_spec(settings: Settings, name: str, partitions: int | None = None) -> NewTopic:
    """How the logical topic ``name`` is created: partitions and topic config."""
    count = 1 if name in SINGLE_PARTITION_TOPICS else (partitions or settings.partitions)
    return NewTopic(
        settings.topic(name),
        num_partitions=count,
        replication_factor=settings.replication_factor,
        config=dict(
            TOPIC_CONFIGS.get(name)
            or ({"cleanup.policy": "compact"} if name.endswith(STATE_CHANGELOG_SUFFIX) else {})
        ),
    )


def ensure_topics(
    settings: Settings,
    names: Iterable[str] = TOPICS,
    partitions: int | None = None,
    timeout: float = 30.0,
) -> list[str]:
    """Create the missing topics among logical ``names``; return the full names created.

    Idempotent: existing topics are left as they are (a partition count that differs
    from the wanted one is logged, not changed). Returns once metadata shows every
    topic, or raises ``BrokerUnavailable`` after ``timeout`` seconds.
    """
    names = list(dict.fromkeys(names))
    admin = AdminClient(admin_config(settings))
    deadline = time.monotonic() + timeout
    existing = _topic_partitions(admin, settings, timeout)

    wanted = {settings.topic(n): topic_spec(settings, n, partitions) for n in names}
    for topic, spec in wanted.items():
        have = existing.get(topic)
        if have is not None and have != spec.num_partitions:
            log.warning("topic %s has %d partitions, wanted %d", topic, have, spec.num_partitions)
    missing = [spec for topic, spec in wanted.items() if topic not in existing]
    created: list[str] = []
    if missing:
        futures = admin.create_topics(missing, request_timeout=timeout)
        for topic, future in futures.items():
            try:
                future.result()
                created.append(topic)
            except KafkaException as exc:
                # Another process created it between our metadata read and now: fine.
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        log.info("created topics %s", ", ".join(created) or "(none)")

    # CreateTopics answering is not the same as metadata showing the topic; a consumer
    # subscribing in between would see UNKNOWN_TOPIC_OR_PART.
    while True:
        remaining = max(0.1, deadline - time.monotonic())
        visible = _topic_partitions(admin, settings, remaining)
        if all(visible.get(topic, 0) >= 1 for topic in wanted):
            return created
        if time.monotonic() >= deadline:
            absent = sorted(topic for topic in wanted if topic not in visible)
            raise BrokerUnavailable(
                f"topics not visible after {timeout:g} s: {absent}; check the broker at "
                f"{resolve_bootstrap(settings)} (`slidr status`, SLIDR_KAFKA_BOOTSTRAP)"
            )
        time.sleep(0.05)


def _topic_partitions(admin: AdminClient, settings: Settings, timeout: float) -> dict[str, int]:
    """Partition count of every healthy topic in the cluster's metadata."""
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"Kafka broker at {resolve_bootstrap(settings)} did not answer a metadata "
            f"request within {timeout:g} s ({exc.args[0].str()}): run `slidr up`, or check "
            "SLIDR_KAFKA_BOOTSTRAP"
        ) from None
    return {
        name: len(topic.partitions)
        for name, topic in metadata.topics.items()
        if topic.error is None
    }
