"""A plain confluent-kafka consumer loop around the same ``DecisionEngine``.

The benchmark runs it beside the Faust worker to show what the framework costs
(``python -m stream.plain_loop --max-clicks N``, settings from ``SLIDR_*``). It is an
at-least-once loop (consume a batch, decide, publish, wait for the acks, commit) but
not a product runtime: no hot swap, live RFM, metrics or dead letters for purchases.
"""

from __future__ import annotations

import time

from events.settings import Settings
from stream.engine import DecisionEngine, RawMessage, tune_garbage_collector
from stream.kafka import CLICKS
from stream.publisher import Publisher
from stream.topics import TopicTail, position


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
    decided = 0
    last = time.monotonic()
    with TopicTail(
        settings,
        [CLICKS],
        group_id=settings.group_id,
        batch=settings.batch_size,
        wait_s=settings.batch_wait_ms / 1000,
    ) as tail:
        for batch in tail.batches():
            if batch:
                messages = [RawMessage(m.value(), *position(m)) for m in batch]
                publisher.send(engine.process(messages))
                publisher.wait()
                tail.commit()
                decided += len(messages)
                last = time.monotonic()
            if max_clicks is not None and decided >= max_clicks:
                break
            idle = time.monotonic() - last
            if stop_after_idle_s is not None and idle > (
                stop_after_idle_s if decided else startup_timeout_s
            ):
                break
    return decided


def main(argv: list[str] | None = None) -> int:
    import argparse

    from models.registry import ModelRegistry
    from stream.local_stack import resolve_endpoints
    from stream.state import PartitionStores, shared_ip_state

    parser = argparse.ArgumentParser(prog="python -m stream.plain_loop", description=__doc__)
    parser.add_argument("--max-clicks", type=int, default=None, help="stop after this many")
    parser.add_argument("--idle-s", type=float, default=3.0, help="stop after this long idle")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    bootstrap, redis_url = resolve_endpoints(settings)
    settings = settings.replace(kafka_bootstrap=bootstrap, redis_url=redis_url)
    model = ModelRegistry(settings.registry).load(settings.model_version or None)
    stores = PartitionStores(settings.home / "plain-state")
    engine = DecisionEngine(model, stores, shared_ip_state(settings, redis_url))
    publisher = Publisher(settings, linger_ms=settings.decision_linger_ms)  # as the worker's
    try:
        decided = run_plain_loop(settings, engine, publisher, args.idle_s, args.max_clicks)
    finally:
        publisher.close()
        engine.user_state.close()
    print(f"decided {decided} clicks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
