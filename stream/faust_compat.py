"""Every use slidr makes of faust-streaming's internals, in one module.

Written against faust-streaming 0.15.3 (``FAUST_VERSION``, pinned in pyproject.toml)
running on aiokafka 0.14.0. ``tests/stream/test_faust_compat.py`` fails when the
installed version differs or when a name below is gone or its signature changed; on an
upgrade, re-read each name in the new release before updating ``RECORDED_SIGNATURES``.

Overridden or wrapped, and why:

- ``faust.transport.consumer.Consumer._drain_messages`` (overridden by ``BatchDrain``):
  the consumer's fetch loop. Faust hands every message to its conductor one by one (two
  tasks, a decode, a channel put and a stream wake-up each: about 200 µs a message here,
  more than slidr's whole decision, capping a worker near 3,000 clicks/s). The override
  is the same loop except that a topic registered with ``BatchingApp.batch_channel``
  gets each fetch's messages as one list on an in-memory channel.
- ``faust.app.base.App._new_transport`` (overridden by ``BatchingApp``): builds the
  transport whose consumer class has ``BatchDrain`` mixed in.
- ``faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._create_worker_consumer``
  (wrapped): faust-streaming hard-codes a 1,500 ms fetch wait; the wrapper writes the
  app's ``fetch_wait_ms`` into aiokafka's private ``AIOKafkaConsumer._fetch_max_wait_ms``,
  which aiokafka reads when the consumer starts. The embedded broker does not wake long
  polls, so latency follows the fetch wait.
- ``faust.transport.drivers.confluent.ConfluentConsumerThread._create_consumer`` and
  ``faust.transport.drivers.confluent.AsyncConsumer.__init__`` (wrapped): the same for
  the librdkafka driver, whose consumer config faust-streaming builds inline (500 ms
  default fetch wait); the first wrapper passes the app's wait to the second, which adds
  it to the config.

- ``faust.tables.manager.TableManager.on_start`` (overridden by ``PromptTableManager``,
  installed through the ``TableManager`` setting): faust waits a fixed second before it
  subscribes, in case tables are defined late. slidr defines no Faust table, and every
  agent before the app starts, so the second is only a longer restart. The override
  runs the same steps (``_update_channels``, ``recovery.start``) without the wait.

The driver wrappers are installed once per process (``install_driver_patches``, called
by ``BatchingApp``) and change nothing for an app without a ``fetch_wait_ms``.

Private names ``BatchDrain`` reads or calls, beside the public consumer API (``getmany``,
``track_message``, ``commit``, ``callback``, ``suspend_flow``, ``diag``):
``Consumer._add_gap``, ``Consumer._read_offset``, ``Consumer._commit_every``,
``Consumer._n_acked``, ``Consumer._unacked_messages``, and mode's ``Service._stopped``
(on the consumer and on the fetcher). ``committed_offset`` reads
``Consumer._committed_offset``: the offset last committed for a partition (read from
the broker on assignment, updated after each commit), for the lag metric.

Group membership (``stream.membership``): ``group_member_id`` reads the member id that
the broker gave the aiokafka consumer (``AIOKafkaConsumerThread._consumer`` and
aiokafka's ``AIOKafkaConsumer._coordinator.member_id``), and ``leave_group`` sends a
LeaveGroup request for another member id through a client of its own, with the app's
bootstrap servers and credentials (faust's ``server_list`` and
``credentials_to_aiokafka_auth``, aiokafka's ``LeaveGroupRequest``).

The agent acknowledges each message with ``consumer.ack(message)`` once its result is
safe (for slidr: once the broker has acknowledged its decision); Faust then commits the
contiguous acknowledged prefix of each partition, as it does for its own streams.
Everything else stays Faust's: group membership, assignment and rebalances, offset
tracking, commits, flow control, and the per-message path for every other topic.
"""

from __future__ import annotations

import functools
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

import faust
from faust.tables.manager import TableManager
from faust.transport import by_url
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.drivers import confluent as faust_confluent
from faust.types import Message

if TYPE_CHECKING:
    from faust.transport.consumer import Consumer as _FaustConsumer
else:
    _FaustConsumer = object  # a mixin: the driver's consumer class comes after it

FAUST_VERSION = "0.15.3"

# Signatures of the faust-streaming methods this module overrides, wraps or calls with
# arguments, without annotations: calls depend on parameter names, kinds and defaults,
# while annotations name types of other packages (mode, aiokafka) and change with them.
RECORDED_SIGNATURES: dict[str, str] = {
    "faust.transport.consumer:Consumer._drain_messages": "(self, fetcher)",
    "faust.transport.consumer:Consumer._add_gap": "(self, tp, offset_from, offset_to)",
    "faust.transport.consumer:Consumer.getmany": "(self, timeout)",
    "faust.transport.consumer:Consumer.track_message": "(self, message)",
    "faust.app.base:App._new_transport": "(self)",
    "faust.tables.manager:TableManager.on_start": "(self)",
    "faust.tables.manager:TableManager._update_channels": "(self)",
    "faust.transport.drivers.aiokafka:AIOKafkaConsumerThread._create_worker_consumer": (
        "(self, transport)"
    ),
    "faust.transport.drivers.confluent:ConfluentConsumerThread._create_consumer": "(self, loop)",
    "faust.transport.drivers.confluent:AsyncConsumer.__init__": (
        "(self, config, logger=None, callback=None, loop=None, on_partitions_revoked=None,"
        " on_partitions_assigned=None, beacon=None)"
    ),
}

# Instance attributes of a faust-streaming consumer that ``BatchDrain`` reads or writes.
CONSUMER_PRIVATE_ATTRIBUTES = (
    "_stopped",
    "_read_offset",
    "_commit_every",
    "_n_acked",
    "_unacked_messages",
    "_committed_offset",
)


class BatchDrain(_FaustConsumer):
    """Mixin for a faust-streaming ``Consumer``: see the module docstring."""

    async def _drain_messages(self, fetcher: Any) -> None:
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        commit_every = self._commit_every
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                self.diag.set_flag(CONSUMER_FETCHING)
                await self.sleep(0)  # getmany may return at once: let the loop run
                if self.should_stop:
                    continue
                await self._hand_over(await self._fetch_batches())
                if commit_every is not None and self._n_acked >= commit_every:
                    self._n_acked = 0
                    await self.commit()
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _fetch_batches(self) -> dict[str, list[Message]]:
        """One fetch: batch topics' messages by topic; the others go Faust's way."""
        channels = cast(BatchingApp, self.app).batch_channels
        read_offset = self._read_offset
        fetched: dict[str, list[Message]] = {}
        async for tp, message in self.getmany(timeout=1.0):
            offset = message.offset
            r_offset = read_offset[tp]
            if r_offset is not None and offset < r_offset:
                continue  # already delivered (Faust drops these too)
            if (
                r_offset
                and offset - r_offset > 1
                and self.app.topics.acks_enabled_for(message.topic)
            ):
                # Offsets skipped by the log (e.g. transaction markers) count as
                # acknowledged, or commits would stop at the gap.
                await self._add_gap(tp, r_offset + 1, offset)
            if tp.topic in channels:
                self.track_message(message)  # pending until the agent acks it
                fetched.setdefault(tp.topic, []).append(message)
            else:
                await self.wait_first(self.callback(message), self.suspend_flow.wait())
            read_offset[tp] = offset
        return fetched

    async def _hand_over(self, fetched: dict[str, list[Message]]) -> None:
        """Queue each topic's batch for its agent (waits while the agent is behind).

        A rebalance suspends flow and then waits for every tracked message to be acked.
        A batch that cannot be queued before flow stops is dropped instead, as Faust
        drops a per-message delivery that is cut short: its clicks are fetched again
        from the committed offsets after the rebalance.
        """
        channels = cast(BatchingApp, self.app).batch_channels
        for topic, messages in fetched.items():
            # The list itself is the channel's value: the agent reads lists, not events.
            put = channels[topic].put(messages)  # type: ignore[arg-type]
            if put not in (await self.wait_first(put, self.suspend_flow.wait())).done:
                self.untrack(messages)

    def untrack(self, messages: list[Message]) -> None:
        """Drop ``messages``: never acked, so never committed, and fetched again from the
        committed offsets; a rebalance no longer waits for them (``wait_empty``)."""
        self._unacked_messages -= set(messages)


def committed_offset(consumer: Any, tp: Any) -> int | None:
    """The offset committed for ``tp`` (the next one to read after a restart), as the
    consumer last committed or read it; None while the group has committed nothing."""
    return cast("int | None", consumer._committed_offset.get(tp))


def group_member_id(app: faust.App) -> str | None:
    """The member id the group coordinator gave ``app``'s consumer; None before it has
    joined, and on a driver other than aiokafka."""
    thread = getattr(app.consumer, "_thread", None)
    consumer = getattr(thread, "_consumer", None)
    member_id = getattr(getattr(consumer, "_coordinator", None), "member_id", None)
    return member_id if isinstance(member_id, str) and member_id else None


async def leave_group(app: faust.App, member_id: str) -> str:
    """Ask the coordinator of ``app``'s group to remove ``member_id``; the name of the
    error it answered (``NoError`` when the member was removed)."""
    # aiokafka ships no annotations (py.typed).
    from aiokafka.client import AIOKafkaClient, CoordinationType  # type: ignore[import-untyped]
    from aiokafka.errors import for_code  # type: ignore[import-untyped]
    from aiokafka.protocol.group import LeaveGroupRequest  # type: ignore[import-untyped]

    conf = app.conf
    client = AIOKafkaClient(
        bootstrap_servers=faust_aiokafka.server_list(conf.broker, 9092),
        client_id=conf.broker_client_id,
        request_timeout_ms=int(conf.broker_request_timeout * 1000),
        **faust_aiokafka.credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context),
    )
    try:
        await client.bootstrap()
        node = await client.coordinator_lookup(CoordinationType.GROUP, conf.id)
        response = await client.send(node, LeaveGroupRequest(conf.id, member_id))
        return str(for_code(response.error_code).__name__)
    finally:
        await client.close()


def _batching_transport(url: str) -> type:
    """The faust-streaming transport for ``url`` with ``BatchDrain`` in its consumer."""
    base = by_url(url)
    consumer = type(f"Batching{base.Consumer.__name__}", (BatchDrain, base.Consumer), {})
    return type(f"Batching{base.__name__}", (base,), {"Consumer": consumer})


class PromptTableManager(TableManager):
    """faust's table manager without its one-second wait at start (module docstring)."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class BatchingApp(faust.App):
    """A ``faust.App`` whose chosen topics reach their agent one fetch at a time.

    ``fetch_wait_ms``: how long the broker may hold a fetch that has nothing to return
    (milliseconds); None keeps the driver's own wait.
    """

    def __init__(self, *args: Any, fetch_wait_ms: int | None = None, **kwargs: Any) -> None:
        install_driver_patches()
        kwargs.setdefault("TableManager", PromptTableManager)
        super().__init__(*args, **kwargs)
        self.fetch_wait_ms = fetch_wait_ms
        self.batch_channels: dict[str, faust.ChannelT] = {}

    def batch_channel(self, topic: faust.TopicT, maxsize: int = 4) -> faust.ChannelT:
        """An in-memory channel that receives ``topic``'s messages as lists, one per fetch.

        Values are faust ``Message`` objects (raw key and value bytes, partition,
        offset, timestamp). At most ``maxsize`` lists wait on the channel; beyond that
        the fetch loop waits, which holds back fetching (backpressure).
        """
        channel = self.channel(maxsize=maxsize)
        for name in topic.topics:
            self.batch_channels[name] = channel
        self.topics.add(topic)  # subscribe: the conductor owns subscriptions
        return channel

    def _new_transport(self) -> Any:
        url = self.conf.broker_consumer[0]
        return _batching_transport(str(url))(self.conf.broker_consumer, self)


# The fetch wait of the app whose confluent consumer is being built, handed from the
# thread's ``_create_consumer`` to ``AsyncConsumer.__init__`` (which sees no app).
_confluent_fetch_wait_ms: ContextVar[int | None] = ContextVar(
    "slidr_confluent_fetch_wait_ms", default=None
)


def _fetch_wait_of(thread: Any) -> int | None:
    return getattr(thread.app, "fetch_wait_ms", None)


def _wrap_aiokafka_worker_consumer(original: Any) -> Any:
    @functools.wraps(original)
    def create_worker_consumer(self: Any, *args: Any, **kwargs: Any) -> Any:
        consumer = original(self, *args, **kwargs)
        fetch_wait_ms = _fetch_wait_of(self)
        if fetch_wait_ms is not None:
            consumer._fetch_max_wait_ms = fetch_wait_ms  # read by aiokafka when it starts
        return consumer

    return create_worker_consumer


def _wrap_confluent_create_consumer(original: Any) -> Any:
    @functools.wraps(original)
    def create_consumer(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _confluent_fetch_wait_ms.set(_fetch_wait_of(self))
        try:
            return original(self, *args, **kwargs)
        finally:
            _confluent_fetch_wait_ms.reset(token)

    return create_consumer


def _wrap_confluent_async_consumer_init(original: Any) -> Any:
    @functools.wraps(original)
    def init(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        fetch_wait_ms = _confluent_fetch_wait_ms.get()
        if fetch_wait_ms is not None:
            config = {
                **config,
                "fetch.wait.max.ms": fetch_wait_ms,
                "fetch.error.backoff.ms": fetch_wait_ms,
            }
        original(self, config, *args, **kwargs)

    return init


_DRIVER_PATCHES = (
    (
        faust_aiokafka.AIOKafkaConsumerThread,
        "_create_worker_consumer",
        _wrap_aiokafka_worker_consumer,
    ),
    (faust_confluent.ConfluentConsumerThread, "_create_consumer", _wrap_confluent_create_consumer),
    (faust_confluent.AsyncConsumer, "__init__", _wrap_confluent_async_consumer_init),
)


def install_driver_patches() -> None:
    """Wrap the driver methods listed in the module docstring; once per process."""
    for owner, name, wrap in _DRIVER_PATCHES:
        current = owner.__dict__[name]
        if getattr(current, "_slidr_patch", False):
            continue
        patched = wrap(current)
        patched._slidr_patch = True
        setattr(owner, name, patched)
