"""``slidr produce``: publish a data set's clicks and purchases to Kafka in time order.

Clicks and purchases are merged by event time and keyed by ``user_id`` (SPEC §1), so a
user's events land in one partition in order. Ground-truth columns never leave the
file. With ``rate`` the events are paced to that many per second (wall clock).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import Producer
from tqdm import tqdm

from data.dataset import Purchases, load_dataset
from events.settings import Settings
from features.columns import ClickColumns
from stream.kafka import CLICKS, PURCHASES, ensure_topics, producer_config


@dataclass
class ProduceReport:
    clicks: int
    purchases: int
    seconds: float
    skipped_rows: int

    def __str__(self) -> str:
        rate = (self.clicks + self.purchases) / max(self.seconds, 1e-9)
        text = (
            f"published {self.clicks:,} clicks and {self.purchases:,} purchases "
            f"in {self.seconds:.1f} s ({rate:,.0f} events/s)"
        )
        if self.skipped_rows:
            text += f"; {self.skipped_rows:,} malformed rows in the files were skipped"
        return text


def click_payload(cols: ClickColumns, i: int) -> bytes:
    return orjson.dumps(cols.row(i))


def purchase_payload(p: Purchases, i: int) -> bytes:
    row = {
        "purchase_id": p.purchase_id[i],
        "ts": float(p.ts[i]),
        "user_id": p.user_id[i],
        "amount": float(p.amount[i]),
    }
    if p.customer_id[i] is not None:
        row["customer_id"] = p.customer_id[i]
    if p.click_id[i] is not None:
        row["click_id"] = p.click_id[i]
    return orjson.dumps(row)


def merged_events(
    cols: ClickColumns, purchases: Purchases, limit: int | None
) -> Iterator[tuple[str, int]]:
    """("click", i) and ("purchase", j) in event-time order; clicks first on ties."""
    n_clicks = len(cols) if limit is None else min(limit, len(cols))
    end_ts = cols.ts[n_clicks - 1] if n_clicks else -np.inf
    # Purchases within the clicks' time span (history before the first click is the
    # offline RFM snapshot's business, not the stream's).
    first_ts = cols.ts[0] if n_clicks else np.inf
    in_span = np.nonzero((purchases.ts >= first_ts) & (purchases.ts <= end_ts))[0]
    i = j = 0
    while i < n_clicks or j < len(in_span):
        if j >= len(in_span) or (i < n_clicks and cols.ts[i] <= purchases.ts[in_span[j]]):
            yield "click", i
            i += 1
        else:
            yield "purchase", int(in_span[j])
            j += 1


def produce_dataset(
    settings: Settings,
    directory: Path,
    rate: float | None = None,
    limit: int | None = None,
    progress: bool = True,
    on_click=None,
) -> ProduceReport:
    """Publish ``directory``'s events; ``on_click(click_id, produce_time)`` per click."""
    data = load_dataset(directory)
    ensure_topics(settings)
    producer = Producer(producer_config(settings))
    clicks_topic, purchases_topic = settings.topic(CLICKS), settings.topic(PURCHASES)
    cols, purchases = data.clicks, data.purchases
    total = len(cols) if limit is None else min(limit, len(cols))
    n_clicks = n_purchases = 0
    started = time.perf_counter()
    bar = tqdm(total=total, unit="click", disable=not progress, mininterval=0.5)
    for kind, i in merged_events(cols, purchases, limit):
        if rate:
            # Pace on the wall clock: event n goes out at started + n / rate.
            due = started + (n_clicks + n_purchases) / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        if kind == "click":
            topic, key, value = clicks_topic, cols.user_id[i], click_payload(cols, i)
        else:
            topic, key, value = (
                purchases_topic,
                purchases.user_id[i],
                purchase_payload(purchases, i),
            )
        while True:
            try:
                producer.produce(topic, key=key.encode(), value=value)
                break
            except BufferError:
                producer.poll(0.05)
        if kind == "click":
            n_clicks += 1
            if on_click is not None:
                on_click(cols.click_id[i], time.time())
            if n_clicks % 1000 == 0:
                bar.update(1000)
                producer.poll(0)
        else:
            n_purchases += 1
    producer.flush(60)
    bar.update(n_clicks % 1000)
    bar.close()
    return ProduceReport(
        n_clicks, n_purchases, time.perf_counter() - started, sum(data.report.malformed.values())
    )
