"""Model switches: the registry says which version is active, ``slidr.control`` tells
the running workers (SPEC §1; the message is declared in ``events.declarations``).

Writers (``promote``, ``rollback``) change the registry first, compare-and-set
(``models.registry``), then publish one control message. A version whose guardrails did
not pass is activated only with ``force``; the message's reason then says so.

A worker trusts nothing on the topic. Its ``ControlFollower`` acts on a message only
when the version is a plain name (``v0001``) that the registry holds, that passed its
guardrails or that the registry holds active by force, that loads, and whose model
scores this build's feature vector; anything else is logged, counted in
``slidr_control_refused{reason}``, and the current model stays. A worker pinned to a
version (``--model`` / ``SLIDR_MODEL_VERSION``) ignores every message, with a log line.

No switch is missed between start-up and following: the topic's end is read before the
registry's active version is settled (``settle_start``), and the follower reads from
that position. The follower never stops for a broker error while the worker runs: it
retries with backoff from the position it reached.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from events.declarations import CONTROL as CONTROL_MESSAGE
from events.errors import SlidrError
from events.schemas import InvalidEvent, parse_control
from events.settings import Settings
from features.definitions import N_FEATURES
from models.registry import (
    GuardrailsNotPassed,
    InputWidthError,
    InvalidVersionName,
    ModelRegistry,
    ModelVersion,
    check_input_width,
    check_version_name,
)
from stream.kafka import CONTROL, BrokerUnavailable, consumer_config, ensure_topics, producer_config

if TYPE_CHECKING:  # the CLI's promote and rollback need neither
    from stream.engine import DecisionEngine
    from stream.metrics import WorkerMetrics

log = logging.getLogger("slidr.control")

# Control messages are rare and a switch may take half a second, so the follower asks
# less often than the clicks' consumer: at the clicks' 20 ms fetch wait an idle worker
# cost Tansu 15.9% of a core; at 500 ms here, 6.9% (CPU time over 10 s).
_CONTROL_FETCH_WAIT_MS = 500
# After a broker error the follower waits this long, doubling up to the maximum.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 30.0
# The same broker error is logged at most this often (it is counted every time).
_ERROR_LOG_EVERY_S = 30.0


# -- writers: the registry, then the topic --------------------------------------------


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


def promote(
    settings: Settings,
    version: str,
    reason: str = "promoted",
    *,
    force: bool = False,
    expected_generation: int | None = None,
) -> dict:
    """Activate ``version`` in the registry and tell the workers.

    Refused when its guardrails did not pass (unless ``force``: recorded in the registry
    and in the message's reason) or when ``expected_generation`` is given and the active
    record moved on since the caller read it (``models.registry.StaleActiveError``).
    """
    event = ModelRegistry(settings.registry).activate(
        version, reason, force=force, expected_generation=expected_generation
    )
    return publish_control(settings, "activate", event["version"], event["reason"])


def rollback(
    settings: Settings,
    to: str | None = None,
    reason: str = "manual rollback",
    *,
    force: bool = False,
    expected_active: str | None = None,
    expected_generation: int | None = None,
) -> dict:
    """Return to ``to`` (default: the newest stable version before the active one whose
    guardrails passed). ``expected_active``: roll back only if that version is still the
    active one (the monitor passes the version it judged)."""
    event = ModelRegistry(settings.registry).rollback(
        to,
        reason,
        force=force,
        expected_active=expected_active,
        expected_generation=expected_generation,
    )
    return publish_control(settings, "rollback", event["version"], event["reason"])


# -- the worker's side ----------------------------------------------------------------


def load_for_serving(registry: ModelRegistry, version: str | None = None) -> ModelVersion:
    """Load ``version`` (default: the active one) and check that it scores rows of this
    build's feature vector (``InputWidthError`` otherwise)."""
    model = registry.load(version)
    check_input_width(model, N_FEATURES)
    return model


def control_end_offset(settings: Settings) -> int | None:
    """The end of the control topic now, or None when the broker does not say (the
    follower then reads it itself and catches up with the registry)."""
    consumer = Consumer(
        consumer_config(settings, group_id=f"{settings.group_id}-control-{time.time_ns()}")
    )
    try:
        _, high = consumer.get_watermark_offsets(
            TopicPartition(settings.topic(CONTROL), 0), timeout=10
        )
        return int(high)
    except KafkaException as exc:
        log.warning("cannot read the end of %s: %s", settings.topic(CONTROL), exc)
        return None
    finally:
        consumer.close()


def settle_start(
    registry: ModelRegistry,
    loaded: ModelVersion,
    pinned: str | None,
    read_control_end: Callable[[], int | None],
) -> tuple[ModelVersion, int | None]:
    """The worker's first model and the control-topic position its follower starts at.

    ``loaded`` was loaded first, to fail fast. The topic's end is read next, and only
    then is the registry's active version read again (and loaded when it changed): a
    switch made before that read is in the registry, one made after it is on the topic
    after the position, so none falls in between. A pinned worker keeps ``loaded``.
    """
    position = read_control_end()
    if pinned is None:
        active = registry.active_version()
        if active is not None and active != loaded.version:
            log.warning("the active version moved to %s during start-up", active)
            loaded = load_for_serving(registry, active)
    return loaded, position


class ControlConsumer(Protocol):
    """What the follower uses of ``confluent_kafka.Consumer`` (tests pass a fake)."""

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float) -> Any: ...
    def assign(self, partitions: list[TopicPartition]) -> None: ...
    def poll(self, timeout: float) -> Any: ...
    def close(self) -> None: ...


class ControlFollower(threading.Thread):
    """Follows ``slidr.control`` and hot-swaps the engine's model between batches.

    ``start_offset``: where the loaded model was decided (``settle_start``); None reads
    the topic's end on first contact and then switches to the registry's active version
    if it is not the one loaded. ``pinned``: the version given by ``--model`` /
    ``SLIDR_MODEL_VERSION``; every message is then ignored. ``apply`` acts on one
    message and can be called without a broker.
    """

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        engine: DecisionEngine,
        metrics: WorkerMetrics | None = None,
        *,
        pinned: str | None = None,
        start_offset: int | None = None,
        consumer_factory: Callable[[], ControlConsumer] | None = None,
    ) -> None:
        super().__init__(name="slidr-control", daemon=True)
        self.registry = registry
        self.engine = engine
        self.metrics = metrics or engine.metrics
        self.pinned = pinned
        self.topic = settings.topic(CONTROL)
        # The version the engine uses from its next batch on: a swap waits for the
        # batch boundary, so this can be ahead of engine.model.
        self.pending_version = engine.model.version
        self.position = start_offset  # the next offset to read
        self.consumer_factory = consumer_factory or (
            lambda: Consumer(
                consumer_config(
                    settings,
                    group_id=f"{settings.group_id}-control-{time.time_ns()}",
                    fetch_wait_max_ms=_CONTROL_FETCH_WAIT_MS,
                )
            )
        )
        self.stop_event = threading.Event()
        self.ready = threading.Event()  # set once assigned
        self._last_error_log = 0.0

    # -- following the topic ----------------------------------------------------------

    def run(self) -> None:
        delay = RETRY_FIRST_S
        while not self.stop_event.is_set():
            consumer = None
            try:
                consumer = self.consumer_factory()
                self._assign(consumer)
                delay = RETRY_FIRST_S
                self._follow(consumer)
            except Exception as exc:  # a broker error, or a bug: never the end of following
                self.metrics.control_errors.inc()
                self._log_error(
                    "control: following %s failed at offset %s (%s); retrying in %.1f s",
                    self.topic,
                    self.position,
                    exc,
                    delay,
                )
                self.stop_event.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
            finally:
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception as exc:  # closing a broken client may fail too
                        log.debug("control: closing the consumer: %s", exc)

    def _assign(self, consumer: ControlConsumer) -> None:
        if self.position is None:
            # Tansu reports the end as the last *batch*'s first offset + 1; exact here
            # because publish_control sends every control message as a batch of its own.
            _, high = consumer.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=10)
            consumer.assign([TopicPartition(self.topic, 0, int(high))])
            self.catch_up_with_registry()
            self.position = int(high)  # only now: a failed catch-up is tried again
        else:
            consumer.assign([TopicPartition(self.topic, 0, self.position)])
        self.ready.set()

    def _follow(self, consumer: ControlConsumer) -> None:
        while not self.stop_event.is_set():
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                # Transport errors: librdkafka reconnects by itself.
                self.metrics.control_errors.inc()
                self._log_error("control: %s: %s", self.topic, error)
                continue
            self.position = msg.offset() + 1  # past it even if acting on it fails
            self.apply(msg.value())

    def _log_error(self, text: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.error(text, *args)

    # -- acting on a message ----------------------------------------------------------

    def apply(self, raw: bytes | None) -> bool:
        """Act on one control message; True when a switch was scheduled."""
        try:
            command = parse_control(raw)
        except InvalidEvent as exc:
            shown = raw[:200] if raw is not None else None
            return self._refuse("malformed", f"malformed control message {shown!r}: {exc}")
        version = command["model_version"]
        what = f"{command.get('action') or 'switch'} {str(version)[:60]!r}"
        if command.get("reason"):
            what += f" ({str(command['reason'])[:200]})"
        if self.pinned is not None:
            self.metrics.control_refused.labels(reason="pinned").inc()
            log.warning(
                "control: ignored %s: this worker is pinned to %s (--model / SLIDR_MODEL_VERSION)",
                what,
                self.pinned,
            )
            return False
        return self.switch_to(version, what)

    def catch_up_with_registry(self) -> bool:
        """Switch to the registry's active version if it is not the one pending (the
        position on the topic was read after the model was loaded)."""
        if self.pinned is not None:
            return False
        active = self.registry.active_version()
        if active is None or active == self.pending_version:
            return False
        return self.switch_to(active, f"the registry's active version {active}")

    def switch_to(self, version: object, what: str) -> bool:
        """Schedule ``version`` for the next batch after every check; True when done."""
        try:
            name = check_version_name(version)
        except InvalidVersionName as exc:
            return self._refuse("version_name", f"{what}: {exc}")
        if name == self.pending_version:
            log.info("control: %s: already the version in use", what)
            return False
        try:
            self.registry.check_can_serve(name)
        except GuardrailsNotPassed as exc:
            return self._refuse("guardrails", f"{what}: {exc}")
        except SlidrError as exc:  # not in the registry
            return self._refuse("unknown_version", f"{what}: {exc}")
        current = self.engine.model  # read once: the decide loop may replace it
        try:
            model = current if current.version == name else self.registry.load(name)
            check_input_width(model, N_FEATURES)
        except InputWidthError as exc:
            return self._refuse("input_width", f"{what}: {exc}")
        except Exception as exc:  # an unreadable model file, a broken graph
            return self._refuse("load_failed", f"{what}: {exc}")
        log.warning("control: %s: switching from %s", what, self.pending_version)
        self.pending_version = name
        self.engine.swap_model(model)
        return True

    def _refuse(self, reason: str, text: str) -> bool:
        self.metrics.control_refused.labels(reason=reason).inc()
        log.error("control: refused %s; staying on %s", text, self.pending_version)
        return False
