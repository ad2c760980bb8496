"""Click validation: what is accepted, what is rejected and why (pure, no Kafka)."""

from __future__ import annotations

import orjson
import pytest

from events.schemas import MAX_FIELD_CHARS, InvalidEvent, parse_click

CLICK = {"click_id": "c1", "ts": 1_762_041_600, "user_id": "u1", "ip": "10.0.0.1"}


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1_762_041_600, 1_762_041_600.0),
        (1_762_041_600.5, 1_762_041_600.5),
        ("2025-11-02T00:00:00Z", 1_762_041_600.0),
        ("2025-11-02T01:00:00+01:00", 1_762_041_600.0),
    ],
)
def test_event_time_as_number_or_rfc3339(ts, expected) -> None:
    assert parse_click(orjson.dumps({**CLICK, "ts": ts}))["ts"] == expected


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ts": True}, "got a boolean"),
        ({"ts": "2025-11-02T00:00:00"}, "no time zone"),
        ({"ts": -1}, "out of range"),
        ({"user_id": 7}, "'user_id' must be a string"),
        ({"context": {"q": 3}}, "context.q must be a string"),
        ({"context": {"q": "x" * (MAX_FIELD_CHARS + 1)}}, "context.q is longer"),
        ({"logged_in": "yes"}, "'logged_in' must be a boolean"),
        ({"ip": "10.0.0.1\x1fx"}, "'ip' contains a control character"),
        ({"session_id": "s\x00"}, "'session_id' contains a control character"),
        ({"user_id": "u\x7f"}, "'user_id' contains a control character"),
    ],
)
def test_invalid_clicks_say_why(change: dict, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=reason):
        parse_click(orjson.dumps({**CLICK, **change}))


def test_ids_may_hold_any_printable_text() -> None:
    click = parse_click({**CLICK, "user_id": "ü user\u200b", "session_id": "s 1", "query": "a\tb"})
    assert click["user_id"] == "ü user\u200b" and click["query"] == "a\tb"


def test_defaults_and_a_callers_dict_left_alone() -> None:
    given = {**CLICK, "context": {"q": "shoes", "empty": None}}
    click = parse_click(given)
    assert click["session_id"] == "u1" and click["user_agent"] == "" and click["logged_in"] is False
    assert click["context"] == {"q": "shoes"}
    assert given == {**CLICK, "context": {"q": "shoes", "empty": None}}  # unchanged


def test_string_subclasses_in_a_callers_dict_are_strings() -> None:
    class Text(str):
        pass

    assert parse_click({**CLICK, "context": {"q": Text("shoes")}})["context"] == {"q": "shoes"}
