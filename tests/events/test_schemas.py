"""Event validation: what is accepted, what is rejected and why, and the worker's
msgspec decoder reaching the same verdicts as ``parse_click`` (pure, no Kafka)."""

from __future__ import annotations

import random

import orjson
import pytest

from events.schemas import (
    MAX_EVENT_BYTES,
    MAX_FIELD_CHARS,
    InvalidEvent,
    check_not_ahead,
    decode_click,
    parse_click,
    parse_decision,
)

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
    raw = orjson.dumps({**CLICK, **change})
    with pytest.raises(InvalidEvent, match=reason):
        parse_click(raw)
    assert verdict(decode_click, raw) == verdict(parse_click, raw)


def test_ids_may_hold_any_printable_text() -> None:
    click = parse_click({**CLICK, "user_id": "ü user\u200b", "session_id": "s 1", "query": "a\tb"})
    assert click["user_id"] == "ü user\u200b" and click["query"] == "a\tb"


def test_optional_fields_given_as_null_are_left_out() -> None:
    nulls = {"device": None, "context": None, "session_id": None, "logged_in": None}
    for parse in (parse_click, decode_click):
        click = parse(orjson.dumps({**CLICK, **nulls}))
        assert "device" not in click and "context" not in click
        assert click["session_id"] == "u1" and click["logged_in"] is False


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


# -- the worker's decoder: parse_click's verdict on every message ---------------------------


def verdict(parse, raw) -> tuple[str, object]:
    """What ``parse`` makes of ``raw``: ("ok", the click) or ("invalid", the reason)."""
    try:
        return "ok", parse(raw)
    except InvalidEvent as exc:
        return "invalid", str(exc)


BODY = b'"click_id":"c1","user_id":"u1","ip":"1.2.3.4","ts":1762041600'
# JSON values that parse_click takes or refuses for reasons msgspec words otherwise or
# does not check at all when it skips an unknown field.
ODD_VALUES = [
    *(b'"\\ud800"', b'"\xff"', b'"\xed\xa0\x80"', b"[1,2,]", b"1e400", b"-0", b"01"),
    *(b"1" * 40, b"[" * 1100 + b"]" * 1100, b"[" * 900 + b"]" * 900, b'"\\u12"', b"tru"),
    *(b"null", b"true", b"1.5", b"-1", b"1e11", b'""', b'"a\\u0000b"', b'"a\\u200bb"'),
    *(b'"2025-11-02T00:00:00Z"', b'"2025-11-02T00:00:00"', b"{}", b'{"a":null}', b"[]"),
    b'"' + b"x" * (MAX_FIELD_CHARS + 1) + b'"',
]
FIELDS = ["ts", "click_id", "user_id", "ip", "session_id", "user_agent", "logged_in"]
FIELDS += ["query", "context", "campaign"]  # campaign: an unknown field


@pytest.mark.parametrize("value", ODD_VALUES, ids=lambda v: repr(v[:20]))
def test_the_decoder_reaches_the_parsers_verdict_on_odd_values(value: bytes) -> None:
    for field in FIELDS:
        for raw in (
            b"{" + BODY + b',"' + field.encode() + b'":' + value + b"}",
            b"{" + BODY + b',"context":{"k":' + value + b"}}",
        ):
            assert verdict(decode_click, raw) == verdict(parse_click, raw), raw[:120]


def test_the_decoder_reaches_the_parsers_verdict_on_damaged_clicks() -> None:
    rng = random.Random(10)
    context = {"publisher": "p", "app": None}
    extra = {"session_id": "s1", "user_agent": "Mozilla/5.0", "logged_in": True}
    full = orjson.dumps({**CLICK, **extra, "device": "mobile", "query": "q", "context": context})
    noise = b'"\\{}[],:0123456789eE.-+tnu\x00\x1f \xff\xc3'
    for _ in range(5000):
        raw = bytearray(full)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(raw))
            roll = rng.random()
            if roll < 0.4:
                raw[i] = rng.randrange(256)
            elif roll < 0.6:
                del raw[i]
            elif roll < 0.9:
                raw[i:i] = bytes([rng.choice(noise)])
            else:
                raw = raw[: i + 1]
        assert verdict(decode_click, bytes(raw)) == verdict(parse_click, bytes(raw)), bytes(raw)


def test_the_decoder_keeps_unknown_fields_and_takes_any_value() -> None:
    raw = orjson.dumps({**CLICK, "campaign": {"name": "spring"}})
    assert decode_click(raw)["campaign"] == {"name": "spring"}
    for raw in (None, b"x" * (MAX_EVENT_BYTES + 1), orjson.dumps(CLICK).decode()):
        assert verdict(decode_click, raw) == verdict(parse_click, raw)
    assert decode_click(dict(CLICK)) == parse_click(dict(CLICK))


# -- decisions ------------------------------------------------------------------------------


def test_invalid_decisions_say_why() -> None:
    good = {"click_id": "c1", "ts": 1.0, "verdict": "valid", "decided_at": 2.0}
    assert parse_decision(good) == {**good, "reasons": [], "degraded": False, "replay": False}
    for change, reason in [
        ({"click_id": ""}, "decision field 'click_id' must be a non-empty string"),
        ({"decided_at": None}, "missing required field 'decided_at'"),
        ({"score": True}, "decision field 'score' must be a number"),
        ({"slice": 3}, "decision field 'slice' must be a string"),
        ({"reasons": ["a", 1]}, "decision field 'reasons' must be a list of strings"),
        ({"late": "no"}, "decision field 'late' must be a boolean"),
    ]:
        with pytest.raises(InvalidEvent, match=reason):
            parse_decision(orjson.dumps({**good, **change}))


def test_only_event_times_beyond_the_skew_ahead_of_now_are_refused() -> None:
    now = 1_762_041_600.0
    check_not_ahead(now + 300.0, now, 300.0)  # at the bound: accepted
    check_not_ahead(0.0, now, 300.0)  # the distant past: never refused
    check_not_ahead(now - 400 * 86_400.0, now, 0.0)
    with pytest.raises(InvalidEvent, match=r"300\.5 s ahead .*SLIDR_MAX_FUTURE_SKEW_S \(300 s\)"):
        check_not_ahead(now + 300.5, now, 300.0)
