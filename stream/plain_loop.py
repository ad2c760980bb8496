"""A plain confluent-kafka consumer loop around the same ``DecisionEngine``.

The benchmark runs it beside the Faust worker to show what the framework costs; it is
also a complete at-least-once runtime (consume a batch, decide, publish, wait for the
acks, commit) for deployments that prefer fewer moving parts.
"""

from __future__ import annotations

import time

from confluent_kafka import Consumer

from slidr.settings import Settings
from stream.engine import DecisionEngine, RawMessage, tune_garbage_collector
from stream.kafka import CLICKS, consumer_config
from stream.publisher import Publisher


def run_plain_loop(
    settings: Settings,
    engine: DecisionEngine,
    publisher: Publisher,
    stop_after_idle_s: float | None = None,
    max_clicks: int | None = None,
    startup_timeout_s: float = 60.0,
) -> int:
    """Decide clicks until idle for ``stop_after_idle_s`` or ``max_clicks`` decided.

    Idleness counts from the first click: joining the group takes seconds on Tansu.
    """
    tune_garbage_collector()  # as the Faust worker does
    consumer = Consumer(consumer_config(settings, settings.group_id))
    consumer.subscribe([settings.topic(CLICKS)])
    decided = 0
    last = time.monotonic()
    try:
        while True:
            batch = consumer.consume(settings.batch_size, settings.batch_wait_ms / 1000)
            messages = [
                RawMessage(m.value(), m.topic(), m.partition(), m.offset(), m.timestamp()[1])
                for m in batch
                if m.error() is None
            ]
            if messages:
                result = engine.process(messages)
                publisher.send(result)
                publisher.wait()
                consumer.commit(asynchronous=False)
                decided += len(messages)
                last = time.monotonic()
            if max_clicks is not None and decided >= max_clicks:
                return decided
            idle = time.monotonic() - last
            if stop_after_idle_s is not None and idle > (stop_after_idle_s if decided else startup_timeout_s):
                return decided
    finally:
        consumer.close()
