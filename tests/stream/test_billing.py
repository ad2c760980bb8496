"""Billing: the latest decision per click wins, totals per advertiser; read from the
``decisions`` topic."""

from __future__ import annotations

import orjson
import pytest
from confluent_kafka import Producer

from events.settings import Settings
from stream.billing import BillingLedger, read_decisions
from stream.kafka import DECISIONS, producer_config


def decision(click_id: str, verdict: str, decided_at: float, replay: bool = False) -> dict:
    return {
        "click_id": click_id,
        "ts": 1000.0,
        "verdict": verdict,
        "decided_at": decided_at,
        "replay": replay,
        "model_version": "v0001",
    }


def test_the_latest_decision_of_a_click_is_the_one_billed() -> None:
    ledger = BillingLedger()
    ledger.apply(decision("c1", "valid", 10.0))
    ledger.apply(decision("c1", "invalid", 20.0, replay=True))  # a replay supersedes
    ledger.apply(decision("c1", "valid", 15.0))  # older than what we hold: arrived late
    ledger.apply(decision("c2", "invalid", 5.0))
    ledger.apply(decision("c2", "invalid", 5.0))  # a redelivered duplicate
    assert ledger.latest == {"c1": (20.0, "invalid", True), "c2": (5.0, "invalid", False)}
    assert ledger.summary() == {
        "clicks": 2,
        "billable": 0,
        "invalid": 2,
        "replayed": 1,
        "decision_messages": 5,
        "verdicts_changed_by_later_decisions": 1,
    }


def test_of_two_decisions_made_at_the_same_time_the_later_message_wins() -> None:
    ledger = BillingLedger()
    ledger.apply(decision("c1", "invalid", 10.0))
    ledger.apply(decision("c1", "valid", 10.0))
    assert ledger.latest["c1"][1] == "valid" and ledger.superseded == 1


def test_totals_per_advertiser_with_unknown_clicks_apart() -> None:
    ledger = BillingLedger(advertiser_of={"a1": "acme", "a2": "acme", "b1": "bolt"})
    for click_id, verdict in [("a1", "valid"), ("a2", "invalid"), ("b1", "valid"), ("x", "valid")]:
        ledger.apply(decision(click_id, verdict, 1.0))
    assert ledger.totals() == {
        "acme": {"billable": 1, "invalid": 1},
        "bolt": {"billable": 1},
        "unknown": {"billable": 1},
    }


def test_the_report_lists_the_largest_advertisers_first() -> None:
    ledger = BillingLedger()
    # adv<n> gets 10 * (n + 1) clicks, 10 of them invalid: adv3 is the largest.
    for n in range(4):
        for k in range(10 * (n + 1)):
            click_id = f"adv{n}-{k}"
            ledger.advertiser_of[click_id] = f"adv{n}"
            ledger.apply(decision(click_id, "invalid" if k < 10 else "valid", 1.0))
    lines = ledger.render(top=2).splitlines()
    assert lines[0].split() == ["advertiser", "billable", "invalid", "invalid", "%"]
    assert lines[1].split() == ["adv3", "30", "10", "25.0%"]
    assert lines[2].split() == ["adv2", "20", "10", "33.3%"]
    assert lines[3] == "... 2 more advertisers"
    assert lines[4].startswith("total: 100 clicks, 60 billable, 40 invalid (0 by replay")


def test_an_empty_ledger_renders() -> None:
    text = BillingLedger().render()
    assert text.splitlines()[-1].startswith("total: 0 clicks")


def test_read_decisions_from_the_topic(stream_settings: Settings) -> None:
    producer = Producer(producer_config(stream_settings))
    topic = stream_settings.topic(DECISIONS)
    # The replay is written first, on another partition than the decision it supersedes:
    # the latest decided_at wins whatever order the partitions are read in.
    sent = [
        (0, decision("c1", "invalid", 3.0, replay=True)),
        (1, decision("c1", "valid", 1.0)),
        (2, decision("c2", "invalid", 2.0)),
    ]
    for partition, record in sent:
        producer.produce(
            topic, key=record["click_id"].encode(), value=orjson.dumps(record), partition=partition
        )
    assert producer.flush(10) == 0
    ledger = read_decisions(stream_settings, BillingLedger(), idle_s=1.0)
    assert ledger.messages == 3
    assert ledger.latest == {"c1": (3.0, "invalid", True), "c2": (2.0, "invalid", False)}


def test_the_billing_command_prints_the_ledger(
    stream_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from slidr.cli import main

    producer = Producer(producer_config(stream_settings))
    for record in (decision("c1", "valid", 1.0), decision("c2", "invalid", 2.0)):
        producer.produce(
            stream_settings.topic(DECISIONS),
            key=record["click_id"].encode(),
            value=orjson.dumps(record),
        )
    assert producer.flush(10) == 0
    monkeypatch.setenv("SLIDR_KAFKA_BOOTSTRAP", stream_settings.kafka_bootstrap)
    monkeypatch.setenv("SLIDR_TOPIC_PREFIX", stream_settings.topic_prefix)
    assert main(["billing", "--idle", "1", "--top", "5"]) == 0
    printed = capsys.readouterr().out
    expected = read_decisions(stream_settings, BillingLedger(), idle_s=1.0).render(5)
    assert expected.strip() and printed.strip() == expected.strip()
