"""``slidr produce``: a data set's events merged in time order, ground truth kept back,
keyed by user; published to the broker."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from data.dataset import load_dataset
from events.schemas import parse_click, parse_purchase
from events.settings import Settings
from stream.kafka import CLICKS, PURCHASES, consumer_config
from stream.producer import (
    ProduceReport,
    click_payload,
    merged_events,
    produce_dataset,
    purchase_payload,
)

T0 = 1_762_041_600.0
CLICK_TIMES = (10.0, 20.0, 30.0, 40.0)
# Before the first click, a tie, between, a tie with the last click, after the last.
PURCHASE_TIMES = (5.0, 20.0, 25.0, 40.0, 45.0)


def write_dataset(directory: Path, malformed_line: bool = False) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    clicks = [
        {
            "click_id": f"c{i}",
            "ts": T0 + ts,
            "user_id": f"u{i % 2}",
            "ip": "198.51.100.4",
            "user_agent": "Mozilla/5.0",
            "ad_id": "ad-9",
            "context": {"publisher": "p1"},
            "is_bot": i == 3,  # ground truth: must never be published
            "bot_kind": "crawler" if i == 3 else None,
        }
        for i, ts in enumerate(CLICK_TIMES)
    ]
    lines = [orjson.dumps(click) for click in reversed(clicks)]  # loading sorts by time
    if malformed_line:
        lines.insert(1, b'{"click_id": "broken"}')
    (directory / "clicks.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    purchases = [
        {"purchase_id": f"p{j}", "ts": T0 + ts, "user_id": "u0", "amount": 9.5}
        for j, ts in enumerate(PURCHASE_TIMES)
    ]
    purchases[1]["click_id"] = "c1"
    purchases[2]["customer_id"] = "cust-7"
    (directory / "purchases.jsonl").write_bytes(b"\n".join(map(orjson.dumps, purchases)) + b"\n")
    return directory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    return load_dataset(write_dataset(tmp_path_factory.mktemp("produce")))


def event_times(dataset, events: list[tuple[str, int]]) -> list[tuple[str, float]]:
    times = {"click": dataset.clicks.ts, "purchase": dataset.purchases.ts}
    return [(kind, float(times[kind][i]) - T0) for kind, i in events]


def test_events_are_merged_in_time_order_clicks_first_on_ties(dataset) -> None:
    merged = event_times(dataset, list(merged_events(dataset.clicks, dataset.purchases, None)))
    # Purchases outside the clicks' time span (5 s, 45 s) are not the stream's business.
    assert merged == [
        ("click", 10.0),
        ("click", 20.0),
        ("purchase", 20.0),
        ("purchase", 25.0),
        ("click", 30.0),
        ("click", 40.0),
        ("purchase", 40.0),
    ]


def test_a_limit_ends_the_events_at_its_last_click(dataset) -> None:
    merged = event_times(dataset, list(merged_events(dataset.clicks, dataset.purchases, 2)))
    assert merged == [("click", 10.0), ("click", 20.0), ("purchase", 20.0)]
    assert list(merged_events(dataset.clicks, dataset.purchases, 0)) == []


def test_payloads_are_valid_events_without_ground_truth(dataset) -> None:
    for i in range(len(dataset.clicks)):
        click = orjson.loads(click_payload(dataset.clicks, i))
        assert "is_bot" not in click and "bot_kind" not in click
        assert parse_click(click_payload(dataset.clicks, i))["click_id"] == f"c{i}"
        assert click["context"] == {"publisher": "p1"} and click["ad_id"] == "ad-9"
    payloads = [orjson.loads(purchase_payload(dataset.purchases, j)) for j in range(5)]
    assert all(parse_purchase(orjson.dumps(p)) for p in payloads)
    assert payloads[1]["click_id"] == "c1" and "customer_id" not in payloads[1]
    assert payloads[2]["customer_id"] == "cust-7" and "click_id" not in payloads[2]
    assert payloads[0]["amount"] == 9.5


def test_the_report_mentions_skipped_rows_only_when_there_are_some() -> None:
    assert str(ProduceReport(1000, 10, 2.0, 0)) == (
        "published 1,000 clicks and 10 purchases in 2.0 s (505 events/s)"
    )
    assert str(ProduceReport(5, 0, 1.0, 3)).endswith("; 3 malformed rows in the files were skipped")


def read_topic(settings: Settings, name: str, count: int) -> list[tuple[int, bytes, dict]]:
    """``count`` records of a topic as (partition, key, value), in each partition's order."""
    consumer = Consumer(consumer_config(settings, group_id=f"produce-test-{time.time_ns()}"))
    topic = settings.topic(name)
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    out: list[tuple[int, bytes, dict]] = []
    deadline = time.monotonic() + 15
    try:
        while len(out) < count and time.monotonic() < deadline:
            for message in consumer.consume(100, 0.2):
                assert message.error() is None, message.error()
                out.append((message.partition(), message.key(), orjson.loads(message.value())))
    finally:
        consumer.close()
    return out


def test_produce_publishes_clicks_and_purchases_keyed_by_user(
    stream_settings: Settings, tmp_path: Path
) -> None:
    directory = write_dataset(tmp_path / "data", malformed_line=True)
    produced: list[str] = []
    report = produce_dataset(
        stream_settings,
        directory,
        rate=50.0,
        progress=False,
        on_click=lambda c, _t: produced.append(c),
    )
    assert (report.clicks, report.purchases, report.skipped_rows) == (4, 3, 1)
    assert report.seconds >= 6 / 50  # paced: the 7th event waits 6/50 s after the first
    assert produced == ["c0", "c1", "c2", "c3"]
    clicks = read_topic(stream_settings, CLICKS, 4)
    assert sorted(value["click_id"] for _, _, value in clicks) == ["c0", "c1", "c2", "c3"]
    for _, key, value in clicks:
        assert key == value["user_id"].encode() and "is_bot" not in value
    for user in (b"u0", b"u1"):  # a user's clicks: one partition, in time order
        mine = [(p, v["ts"]) for p, k, v in clicks if k == user]
        assert len({p for p, _ in mine}) == 1 and [ts for _, ts in mine] == sorted(
            ts for _, ts in mine
        )
    purchases = read_topic(stream_settings, PURCHASES, 3)
    assert sorted(v["purchase_id"] for _, _, v in purchases) == ["p1", "p2", "p3"]
    assert all(key == b"u0" for _, key, _ in purchases)
