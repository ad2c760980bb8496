"""The Faust application behind ``slidr worker``.

Agents:

- ``decide``: consumes ``clicks`` one fetch at a time (``stream.faust_compat``: Faust's
  per-message path would cost more than the decision itself), runs the
  ``DecisionEngine`` and publishes the decisions. A batch's messages are acked to Faust
  (which commits acked offsets every second) only when the broker has acknowledged
  every decision of the batch and of every batch before it, so offsets become
  committable in offset order; meanwhile the next batch is decided (``AckPipeline``).
  The engine never raises for a batch (bounded retries, then click by click, failures
  dead-lettered), so no message holds its partition back.
  At least once: a crash re-delivers the uncommitted tail, and the engine re-emits the
  stored decision for clicks it had already decided.
  With ``SLIDR_STATE_CHANGELOG`` a batch's user state goes to the changelog first and
  a partition is restored from it before its first batch is decided
  (``stream.changelog``).
- ``purchases``: consumes ``purchases`` into the live RFM cache; malformed ones go to the
  dead-letter topic like malformed clicks.

Model switches arrive on ``slidr.control`` and are followed by a ``ControlFollower``
thread (``stream.control``) outside the consumer group, so every worker sees every
switch; it checks each one before loading anything, and a pinned worker ignores them.

Tuning for the embedded broker (FINDINGS.md): a 6 s session (group joins are held for
half of it), and a short fetch wait instead of the 1.5 s that faust-streaming hard-codes
(the broker does not wake long polls, so latency follows the fetch wait).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from typing import cast

import faust

from events.schemas import InvalidEvent, parse_purchase
from events.settings import Settings
from features.windows import DAY_S
from models.registry import ModelRegistry
from stream.changelog import ChangelogStores, ensure_changelog, from_topic
from stream.control import ControlFollower, control_end_offset, load_for_serving, settle_start
from stream.engine import (
    BatchResult,
    DecisionEngine,
    dead_letter,
    tune_garbage_collector,
)
from stream.faust_compat import BatchDrain, BatchingApp, committed_offset
from stream.health import WorkerHealth
from stream.kafka import CLICKS, PURCHASES, ensure_topics
from stream.local_stack import resolve_endpoints
from stream.membership import (
    claim_instance,
    fence_previous_incarnation,
    instance_id,
    record_member_on_assignment,
    static_instance_id,
)
from stream.metrics import WorkerMetrics
from stream.publisher import AckPipeline, DeliveryError, Publisher
from stream.rfm import RfmCache
from stream.state import PartitionStores, shared_ip_state

log = logging.getLogger("slidr.worker")


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
    health: WorkerHealth  # what /healthz and /readyz answer


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
    # The model first: a missing or unreadable model file, or one of another input
    # width, fails fast, naming its path.
    registry = ModelRegistry(settings.registry)
    pinned = settings.model_version or None
    model = load_for_serving(registry, pinned)
    bootstrap, redis_url = resolve_endpoints(settings)
    ensure_topics(settings)
    # The control topic's end is read before the active version is settled, and the
    # follower starts there: a promotion made during start-up is not missed.
    model, control_start = settle_start(
        registry, model, pinned, lambda: control_end_offset(settings)
    )
    metrics = WorkerMetrics()
    state_root = settings.home / "state" / settings.group_id
    changelog: ChangelogStores | None = None
    if settings.state_changelog:  # user state follows its partition (stream.changelog)
        ensure_changelog(settings)
        stores: PartitionStores = (changelog := ChangelogStores(state_root, from_topic(settings)))
    else:
        stores = PartitionStores(state_root)
    ip_state = shared_ip_state(settings, redis_url)
    rfm = RfmCache.from_version(registry.path_of(model.version), settings.rfm_cache_size)
    engine = DecisionEngine(
        model,
        stores,
        ip_state,
        metrics,
        log_features=settings.log_features,
        rfm=rfm,
        batch_retries=settings.batch_retries,
        max_future_skew_s=settings.max_future_skew_s,
    )
    publisher = Publisher(settings, linger_ms=settings.decision_linger_ms)
    control = ControlFollower(
        settings, registry, engine, metrics, pinned=pinned, start_offset=control_start
    )

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
        consumer_group_instance_id=static_instance_id(settings),  # stream.membership
    )
    record_member_on_assignment(app, settings)
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
    failures: list[BaseException] = []
    # The engine always holds a loaded model (build_worker fails without one; a swap
    # replaces it between batches), so readiness waits on the assignment alone.
    health = WorkerHealth(model_version=lambda: engine.model.version)

    def stop_on_refused_decisions(exc: DeliveryError) -> None:
        # librdkafka gave up on a decision after its own retries. Stop the worker rather
        # than decide on: the batch's offsets are never committed, so a restarted worker
        # decides (or re-emits) those clicks again.
        log.critical("stopping: %s", exc)
        failures.append(exc)
        health.stopped(str(exc))
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
                # faust types app.consumer as ConsumerT; it is the transport's consumer
                # with BatchDrain mixed in (stream.faust_compat).
                cast(BatchDrain, app.consumer).untrack(fetched)
                metrics.stale_batches.inc()
                continue
            if changelog is not None:
                # Restored before any of their clicks is decided (in a thread); a
                # rebalance during a long restore makes the batch stale.
                await changelog.prepare({m.partition for m in fetched})
                if fetched[0].generation_id != app.consumer_generation_id:
                    cast(BatchDrain, app.consumer).untrack(fetched)
                    metrics.stale_batches.inc()
                    continue
            result = engine.process(fetched)  # Faust messages are SourceMessages
            written = changelog.take_changelog() if changelog is not None else None
            if written is not None:
                result.changelog = written.records  # acknowledged before the offsets

            def safe(fetched=fetched, written=written, result=result) -> None:
                if written is not None and changelog is not None:
                    changelog.acknowledge(written, result.changelog_offsets)
                acked_at = time.time()
                for m in fetched:
                    ack(m)
                # Faust's timestamps are the records' Kafka timestamps in seconds (None
                # only for pre-0.10 message formats, which carry none).
                metrics.decision_latency.observe_many(
                    [acked_at - m.timestamp for m in fetched if m.timestamp is not None]
                )

            def refused(_reason: str, fetched=fetched) -> None:  # the worker is stopping
                cast(BatchDrain, app.consumer).untrack(fetched)

            await acks.submit(result, safe, refused)

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

    @app.timer(1.0)
    async def heartbeat():
        health.beat()  # /healthz: the event loop still turns

    @app.timer(5.0)
    async def report_lag():
        report_committed_lag(app.consumer, clicks.get_topic_name(), metrics)

    @app.task
    async def after_start():
        tune_garbage_collector()  # once Faust's start-up objects exist

    @app.timer(3600.0)
    async def expire_rfm():
        rfm.expire(engine.featurizer.watermark - 400 * DAY_S)

    # mode types a handler as (sender, *args, signal=...); faust sends this signal exactly
    # one argument, the revoked partitions, which the handler names.
    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def on_revoked(app_, revoked, **kwargs):
        mine = {tp.partition for tp in revoked if tp.topic == clicks.get_topic_name()}
        if changelog is not None and mine and not await acks.drain(session_s / 2):
            # Batches still unacknowledged: their state reaches the log but not this
            # host's RocksDB, and a restore that runs before they land misses them.
            log.warning("revoking with decided batches unacknowledged")
        engine.release_partitions(sorted(mine))  # their state and their watermarks
        health.revoked(mine)
        metrics.forget_partitions(mine)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def on_assigned(app_, assigned, **kwargs):
        health.assigned(tp.partition for tp in assigned if tp.topic == clicks.get_topic_name())

    restoring: set[asyncio.Task] = set()  # held: the loop keeps tasks only weakly

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def restore_assigned(app_, assigned, **kwargs):
        # Start restoring at once, without holding up the rebalance; the agent waits
        # for a partition's restore before deciding its first batch.
        if changelog is not None:
            mine = {tp.partition for tp in assigned if tp.topic == clicks.get_topic_name()}
            task = asyncio.ensure_future(changelog.prepare(mine))
            restoring.add(task)
            task.add_done_callback(restoring.discard)
            health.restoring(mine)  # /readyz: not ready until they can be decided
            task.add_done_callback(functools.partial(_restore_ended, health, mine))

    return Worker(app, engine, publisher, control, metrics, stores, failures, health)


def _restore_ended(health: WorkerHealth, partitions: set[int], _task: asyncio.Future) -> None:
    health.restored(partitions)


def committed_lag(high: int | None, committed: int | None) -> int | None:
    """Messages of a partition that a restart would read again: its high watermark (the
    next offset to be written) minus its committed offset (the next one to read), None
    while the high watermark is unknown. Nothing committed counts from offset 0."""
    if high is None:
        return None
    return max(0, high - (committed or 0))


def report_committed_lag(consumer, topic: str, metrics: WorkerMetrics) -> None:
    """Set the lag gauge of each assigned partition of ``topic`` from committed offsets,
    not decided ones: a batch decided but never acknowledged (so never committed) keeps
    counting as lag, and a partition whose commits are stuck shows."""
    for tp in consumer.assignment():
        if tp.topic != topic:
            continue
        lag = committed_lag(consumer.highwater(tp), committed_offset(consumer, tp))
        if lag is not None:
            metrics.consumer_lag.labels(partition=str(tp.partition)).set(lag)


def run_worker(settings: Settings, loglevel: str = "info") -> None:
    """Run until interrupted (``slidr worker``)."""

    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())
    claim = claim_instance(settings)  # held until the process ends (stream.membership)
    worker = build_worker(settings)
    # Before Faust joins: the member a killed predecessor left would hold up the join.
    asyncio.get_event_loop().run_until_complete(fence_previous_incarnation(worker.app, settings))
    if settings.metrics_port:
        worker.metrics.serve(settings.metrics_port, settings.metrics_host, worker.health)
    worker.control.start()
    log.warning(
        "slidr worker: model %s%s, group %s (instance %s, %s membership), topics %s*",
        worker.engine.model.version,
        " (pinned: control messages are ignored)" if worker.control.pinned else "",
        settings.group_id,
        instance_id(settings),
        settings.group_membership,
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
        worker.health.stopped("shutting down")  # probes now see it before the process ends
        worker.control.stop_event.set()
        worker.publisher.close(timeout_s=0 if worker.failures else 10)
        worker.stores.close()
        if claim is not None:
            claim.close()  # the next incarnation may take the instance id
