"""Faust delivery a fetch at a time, for topics whose agent works on micro-batches.

faust-streaming hands every consumed message to its conductor one by one: per message
it starts two tasks (``wait_first(callback(message), suspend_flow.wait())``), decodes
an event, queues it on the topic's channel and wakes the stream. That costs about
200 µs a message here, more than slidr's whole decision (profiled: ``_drain_messages``
-> ``wait_first`` -> ``conductor.on_message``), and caps a worker near 3,000 clicks/s.

``BatchingApp.batch_channel(topic)`` routes a topic around that path: the consumer's
fetch loop (``BatchDrain._drain_messages``, the same loop as faust-streaming's with the
routing added) collects the topic's messages of each fetch into one list and puts the
list on an in-memory channel, which an ordinary agent consumes. Everything else stays
Faust's: group membership, assignment and rebalances, offset tracking (each message is
tracked as pending), commits of acknowledged offsets, flow control, and the per-message
path for every other topic.

The agent acknowledges each message with ``consumer.ack(message)`` once its result is
safe (for slidr: once the broker has acknowledged its decision); Faust then commits the
contiguous acknowledged prefix of each partition, as it does for its own streams.
"""

from __future__ import annotations

from typing import Any

import faust
from faust.transport import by_url
from faust.transport.consumer import CONSUMER_FETCHING
from faust.types import Message


class BatchDrain:
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
        channels = self.app.batch_channels
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
        channels = self.app.batch_channels
        for topic, messages in fetched.items():
            put = channels[topic].put(messages)
            if put not in (await self.wait_first(put, self.suspend_flow.wait())).done:
                self.untrack(messages)

    def untrack(self, messages: list[Message]) -> None:
        """Drop ``messages``: never acked, so never committed, and fetched again from the
        committed offsets; a rebalance no longer waits for them (``wait_empty``)."""
        self._unacked_messages.difference_update(messages)


def _batching_transport(url: str) -> type:
    """The faust-streaming transport for ``url`` with ``BatchDrain`` in its consumer."""
    base = by_url(url)
    consumer = type(f"Batching{base.Consumer.__name__}", (BatchDrain, base.Consumer), {})
    return type(f"Batching{base.__name__}", (base,), {"Consumer": consumer})


class BatchingApp(faust.App):
    """A ``faust.App`` whose chosen topics reach their agent one fetch at a time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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
