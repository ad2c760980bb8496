"""The Faust application behind ``slidr worker``.

Agents:

- ``decide``: consumes ``clicks`` one fetch at a time (``stream.faust_compat``: Faust's
  per-message path would cost more than the decision itself), runs the
  ``DecisionEngine`` and publishes the decisions. A batch's messages are acked to Faust
  (which commits acked offsets every second) only when the broker has acknowledged
  every decision of the batch; meanwhile the next batch is decided (``AckPipeline``).
  At least once: a crash re-delivers the uncommitted tail, and the engine re-emits the
  stored decision for clicks it had already decided.
- ``purchases``: consumes ``purchases`` into the live RFM cache; malformed ones go to the
  dead-letter topic like malformed clicks.

Model switches arrive on ``slidr.control`` and are followed by a ``ControlFollower``
thread outside the consumer group, so every worker sees every switch.

Tuning for the embedded broker (FINDINGS.md): a 6 s session (group joins are held for
half of it), and a short fetch wait instead of the 1.5 s that faust-streaming hard-codes
(the broker does not wake long polls, so latency follows the fetch wait).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import faust
from confluent_kafka import Consumer, TopicPartition

from events.schemas import InvalidEvent, parse_control, parse_purchase
from events.settings import Settings
from features.windows import DAY_S
from models.registry import ModelRegistry
from stream.engine import (
    BatchResult,
    DecisionEngine,
    dead_letter,
    tune_garbage_collector,
)
from stream.faust_compat import BatchingApp
from stream.kafka import CLICKS, CONTROL, PURCHASES, consumer_config, ensure_topics
from stream.local_stack import resolve_endpoints
from stream.metrics import WorkerMetrics
from stream.publisher import AckPipeline, DeliveryError, Publisher
from stream.rfm import RfmCache
from stream.state import PartitionStores, shared_ip_state

log = logging.getLogger("slidr.worker")

_CONTROL_FETCH_WAIT_MS = 500


class ControlFollower(threading.Thread):
    """Follows ``slidr.control`` from its end and hot-swaps the engine's model."""

    def __init__(self, settings: Settings, registry: ModelRegistry, engine: DecisionEngine) -> None:
        super().__init__(name="slidr-control", daemon=True)
        self.registry = registry
        self.engine = engine
        self.stop_event = threading.Event()
        # Control messages are rare and a switch may take half a second, so this consumer
        # asks less often than the clicks' one: at the clicks' 20 ms fetch wait an idle
        # worker cost Tansu 15.9% of a core; at 500 ms here, 6.9% (CPU time over 10 s).
        config = consumer_config(
            settings,
            group_id=f"{settings.group_id}-control-{time.time_ns()}",
            fetch_wait_max_ms=_CONTROL_FETCH_WAIT_MS,
        )
        self.consumer = Consumer(config)
        self.topic = settings.topic(CONTROL)
        self.ready = threading.Event()

    def run(self) -> None:
        try:
            # Start at the end: the registry already gave this worker the active version.
            # Tansu reports the end as the last *batch*'s first offset + 1; exact here
            # because publish_control sends every control message as a batch of its own.
            _, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=10)
            self.consumer.assign([TopicPartition(self.topic, 0, high)])
        except Exception as exc:  # the worker still runs on its start-up version
            log.error("cannot follow %s: %s", self.topic, exc)
            return
        self.ready.set()
        while not self.stop_event.is_set():
            msg = self.consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            self.apply(msg.value())
        self.consumer.close()

    def apply(self, raw: bytes) -> None:
        try:
            command = parse_control(raw)
            version = command["model_version"]
            if version == self.engine.model.version:
                return
            model = self.registry.load(version)
        except Exception as exc:
            log.error("ignoring control message %r: %s", raw[:200], exc)
            return
        log.warning(
            "control: %s %s (%s)", command.get("action"), version, command.get("reason", "")
        )
        self.engine.swap_model(model)


@dataclass
class Worker:
    """Everything a running worker holds, built by ``build_worker``."""

    app: faust.App
    engine: DecisionEngine
    publisher: Publisher
    control: ControlFollower
    metrics: WorkerMetrics
    stores: PartitionStores
    failures: list[BaseException]  # why the worker stopped itself, if it did


def _faust_credentials(settings: Settings):
    protocol = settings.kafka_security_protocol
    if protocol.startswith("SASL"):
        import ssl

        context = (
            ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
            if protocol == "SASL_SSL"
            else None
        )
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    if protocol == "SSL":
        import ssl

        return faust.SSLCredentials(
            ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
        )
    return None


def build_worker(settings: Settings) -> Worker:
    """Load the model, connect the stores and define the Faust app and its agents."""
    # The model first: a missing or unreadable model file fails fast, naming its path.
    registry = ModelRegistry(settings.registry)
    model = registry.load(settings.model_version or None)
    bootstrap, redis_url = resolve_endpoints(settings)
    ensure_topics(settings)
    metrics = WorkerMetrics()
    stores = PartitionStores(settings.home / "state" / settings.group_id)
    ip_state = shared_ip_state(settings, redis_url)
    rfm = RfmCache.from_version(registry.path_of(model.version))
    engine = DecisionEngine(
        model, stores, ip_state, metrics, log_features=settings.log_features, rfm=rfm
    )
    publisher = Publisher(settings, linger_ms=settings.decision_linger_ms)
    control = ControlFollower(settings, registry, engine)

    (settings.home / "faust").mkdir(parents=True, exist_ok=True)
    session_s = settings.session_timeout_ms / 1000
    app = BatchingApp(
        settings.group_id,
        # "kafka://" is faust-streaming's aiokafka driver; "confluent://" its librdkafka one.
        broker=f"{'confluent' if settings.faust_transport == 'confluent' else 'kafka'}://{bootstrap}",
        broker_credentials=_faust_credentials(settings),
        store="memory://",
        datadir=str(settings.home / "faust"),  # not the working directory
        web_enabled=False,
        topic_partitions=settings.partitions,
        fetch_wait_ms=settings.fetch_wait_ms,  # see the module docstring
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=session_s,
        broker_heartbeat_interval=max(0.3, session_s / 6),
        broker_commit_interval=1.0,
        broker_max_poll_records=settings.batch_size,  # one fetch is one micro-batch at most
        stream_buffer_maxsize=max(4096, settings.batch_size * 4),
    )
    clicks = app.topic(
        settings.topic(CLICKS),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    purchases = app.topic(
        settings.topic(PURCHASES),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
    )
    click_batches = app.batch_channel(clicks)
    last_offsets: dict[int, int] = {}
    failures: list[BaseException] = []

    def stop_on_refused_decisions(exc: DeliveryError) -> None:
        # librdkafka gave up on a decision after its own retries. Stop the worker rather
        # than decide on: the batch's offsets are never committed, so a restarted worker
        # decides (or re-emits) those clicks again.
        log.critical("stopping: %s", exc)
        failures.append(exc)
        asyncio.ensure_future(app.crash(exc))

    acks = AckPipeline(publisher, on_failure=stop_on_refused_decisions)

    @app.agent(click_batches, name="decide")
    async def decide(fetches):
        # One list of click messages per fetch (stream.faust_compat), at most
        # batch_size long: decide, publish, and let the messages be committed only
        # once the broker has acknowledged every decision of the batch.
        ack = app.consumer.ack
        async for fetched in fetches:
            # As Faust's own streams do: a batch fetched before a rebalance is dropped,
            # and its clicks are fetched again by their new owner from the committed
            # offsets. Deciding it here would reopen the state of partitions this worker
            # just gave away.
            if (
                not app.flow_control.is_active()
                or fetched[0].generation_id != app.consumer_generation_id
            ):
                app.consumer.untrack(fetched)
                metrics.stale_batches.inc()
                continue
            result = engine.process(fetched)  # Faust messages are SourceMessages

            def safe(fetched=fetched) -> None:
                for m in fetched:
                    ack(m)

            def refused(_reason: str, fetched=fetched) -> None:  # the worker is stopping
                app.consumer.untrack(fetched)

            await acks.submit(result, safe, refused)
            for msg in fetched:
                last_offsets[msg.partition] = msg.offset

    @app.agent(purchases, name="purchases")
    async def follow_purchases(stream):
        async for events in stream.take_events(
            settings.batch_size, within=settings.batch_wait_ms / 1000
        ):
            dead = BatchResult()
            for e in events:
                metrics.purchases_in.inc()
                message = e.message  # a SourceMessage, as the clicks' are
                try:
                    rfm.add(parse_purchase(message.value))
                except InvalidEvent as exc:
                    dead.dead_letters.append((None, dead_letter(message, str(exc))))
                    metrics.dlq.labels(topic=message.topic).inc()
            if dead.dead_letters:
                await acks.publish(dead)

    @app.timer(5.0)
    async def report_lag():
        consumer = app.consumer
        for tp in consumer.assignment():
            if tp.topic != clicks.get_topic_name():
                continue
            high = consumer.highwater(tp)
            if high is not None and tp.partition in last_offsets:
                metrics.consumer_lag.labels(partition=str(tp.partition)).set(
                    max(0, high - last_offsets[tp.partition] - 1)
                )

    @app.task
    async def after_start():
        tune_garbage_collector()  # once Faust's start-up objects exist

    @app.timer(3600.0)
    async def expire_rfm():
        rfm.expire(engine.featurizer.watermark - 400 * DAY_S)

    @app.on_partitions_revoked.connect
    async def on_revoked(app_, revoked, **kwargs):
        mine = {tp.partition for tp in revoked if tp.topic == clicks.get_topic_name()}
        stores.release(sorted(mine))

    return Worker(app, engine, publisher, control, metrics, stores, failures)


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run until interrupted (``slidr worker``)."""

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())
    worker = build_worker(settings)
    if settings.metrics_port:
        worker.metrics.serve(settings.metrics_port)
    worker.control.start()
    log.warning(
        "slidr worker: model %s, group %s, topics %s*",
        worker.engine.model.version,
        settings.group_id,
        settings.topic_prefix,
    )
    try:
        faust.Worker(
            worker.app, loglevel=loglevel, redirect_stdouts=False, quiet=True
        ).execute_from_commandline()
    except SystemExit as exit_:
        if worker.failures and not exit_.code:
            raise SystemExit(1) from worker.failures[0]
        raise
    finally:
        worker.control.stop_event.set()
        worker.publisher.close(timeout_s=0 if worker.failures else 10)
        worker.stores.close()
