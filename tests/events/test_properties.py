"""Property-based tests of click parsing (hypothesis).

Whatever arrives on the clicks topic, ``parse_click`` and the worker's ``decode_click``
either give a click that satisfies the declaration or raise ``InvalidEvent``, never
anything else, and they agree on both the verdict and the click. Examples are
derandomized, so a run is the same in CI as here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.declarations import CLICK, Kind
from events.schemas import (
    LATEST_TS,
    MAX_EVENT_BYTES,
    MAX_FIELD_CHARS,
    InvalidEvent,
    decode_click,
    parse_click,
)

PROPERTIES = settings(
    max_examples=200,
    derandomize=True,
    database=None,  # nothing written to the tree
    deadline=None,  # a busy CI host must not turn a slow example into a failure
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Characters that matter to the parsers: ASCII control characters (the shared store's
# separators among them), lone surrogates (not UTF-8), zero-width and wide characters.
_ODD_CHARACTERS = st.sampled_from(
    ["\x00", "\x1d", "\x1e", "\x1f", "\x7f", "\n", "\u200b", "\ud800", "\udfff", "é", "😀", "|"]
)
_TEXT = st.text(
    alphabet=st.one_of(st.characters(codec="utf-8"), _ODD_CHARACTERS), max_size=20
) | st.sampled_from(["", "x" * MAX_FIELD_CHARS, "x" * (MAX_FIELD_CHARS + 1)])
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -1, 1.7e9, LATEST_TS, LATEST_TS + 1, 1e308, -0.0, 2**63, 2**64]),
)
_TIMES = st.one_of(
    _NUMBERS,
    st.sampled_from(
        [
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00+02:00",
            "2026-01-01T00:00:00",  # no zone
            "2999-12-31T23:59:59z",
            "3001-01-01T00:00:00Z",
            "not a time",
            " 2026-01-01T00:00:00Z ",
        ]
    ),
)
_JSON_SCALARS = st.one_of(st.none(), st.booleans(), _NUMBERS, _TEXT)
_JSON_VALUES = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=8,
)


# Values a well-behaved producer sends (printable ids, times in range).
_WELL_FORMED_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")),
    min_size=1,
    max_size=20,
)
_WELL_FORMED_TIMES = st.one_of(
    st.floats(min_value=0.0, max_value=LATEST_TS),
    st.integers(min_value=0, max_value=int(LATEST_TS)),
    st.just("2026-01-01T00:00:00Z"),
)


def _field_value(kind: Kind, mode: int) -> st.SearchStrategy[Any]:
    """A field's value: well formed (mode 0), odd but of its kind (1), or any JSON (2)."""
    if kind is Kind.TIME:
        return (_WELL_FORMED_TIMES, _TIMES, _JSON_VALUES)[mode]
    if kind is Kind.BOOLEAN:
        return (st.booleans(), st.booleans(), _JSON_VALUES)[mode]
    if kind is Kind.STRING_MAP:
        well_formed = st.dictionaries(_WELL_FORMED_TEXT, st.none() | _WELL_FORMED_TEXT, max_size=3)
        odd = st.dictionaries(_TEXT, st.none() | _TEXT, max_size=3)
        return (well_formed, odd, _JSON_VALUES)[mode]
    return (_WELL_FORMED_TEXT, _TEXT, _JSON_VALUES)[mode]


@st.composite
def click_like(draw: st.DrawFn) -> dict:
    """A JSON object shaped like a click: each declared field mostly well formed, else
    absent, null, odd or anything, and now and then an unknown field (about a third of
    them are valid clicks)."""
    event: dict[str, Any] = {}
    for field in CLICK.fields:
        roll = draw(st.integers(0, 39))
        if roll == 0:  # absent
            continue
        if roll == 1:
            event[field.name] = None
            continue
        event[field.name] = draw(_field_value(field.kind, 0 if roll > 3 else roll - 1))
    if draw(st.integers(0, 4)) == 0:
        event[draw(_TEXT)] = draw(_JSON_VALUES)
    return event


def _encode(value: Any) -> bytes:
    """JSON as a producer may send it: ASCII-escaped (so lone surrogates travel as
    ``\\udXXX`` escapes, which orjson refuses) or raw UTF-8 where it can be."""
    text = json.dumps(value, ensure_ascii=True)
    return text.encode("ascii")


def _verdict(parse: Any, raw: Any) -> tuple[str, Any]:
    """("click", the click) or ("invalid", the reason); any other exception escapes."""
    try:
        return "click", parse(raw)
    except InvalidEvent as exc:
        assert str(exc), "a rejection must give its reason"
        return "invalid", str(exc)


def _assert_satisfies_declaration(click: dict) -> None:
    for field in CLICK.fields:
        value = click.get(field.name)
        if field.required:
            assert value is not None, field.name
        if value is None:
            assert field.name not in click or field.kind is Kind.BOOLEAN, field.name
            continue
        if field.kind is Kind.TIME:
            assert type(value) is float and math.isfinite(value), (field.name, value)
            assert 0.0 <= value <= LATEST_TS, (field.name, value)
        elif field.kind is Kind.BOOLEAN:
            assert type(value) is bool, (field.name, value)
        elif field.kind is Kind.STRING_MAP:
            assert isinstance(value, dict), (field.name, value)
            for item in value.values():
                assert type(item) is str and len(item) <= MAX_FIELD_CHARS, (field.name, item)
        else:
            assert type(value) is str and len(value) <= MAX_FIELD_CHARS, (field.name, value)
            if field.required or field.default_from is not None:
                assert value, f"{field.name} must not be empty"
        if field.state_key:
            assert isinstance(value, str)
            assert not any(ord(c) < 0x20 or c == "\x7f" for c in value), (field.name, value)
    for field in CLICK.select(kind=Kind.BOOLEAN):
        assert type(click[field.name]) is bool, field.name
    assert click["session_id"], "session_id defaults to user_id"


def _assert_agree(raw: bytes) -> None:
    parsed = _verdict(parse_click, raw)
    decoded = _verdict(decode_click, raw)
    assert parsed[0] == decoded[0], (raw[:200], parsed, decoded)
    if parsed[0] == "click":
        _assert_satisfies_declaration(parsed[1])
        assert parsed[1] == decoded[1], raw[:200]
    else:
        assert parsed[1] == decoded[1], raw[:200]  # the same reason in the dead letter


@PROPERTIES
@given(click_like())
def test_click_shaped_objects_are_parsed_alike_or_rejected(event: dict) -> None:
    _assert_agree(_encode(event))


@PROPERTIES
@given(click_like())
def test_raw_utf8_objects_are_parsed_alike_or_rejected(event: dict) -> None:
    try:
        raw = orjson.dumps(event)
    except orjson.JSONEncodeError:  # a lone surrogate or an integer beyond 64 bits
        raw = _encode(event)
    _assert_agree(raw)


@PROPERTIES
@given(_JSON_VALUES)
def test_any_json_value_is_parsed_alike_or_rejected(value: Any) -> None:
    _assert_agree(_encode(value))


@PROPERTIES
@given(st.binary(max_size=512))
def test_any_bytes_are_parsed_alike_or_rejected(raw: bytes) -> None:
    _assert_agree(raw)


@PROPERTIES
@given(
    click_like(),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
def test_damaged_clicks_are_parsed_alike_or_rejected(
    event: dict, damage: list[tuple[int, int, int]]
) -> None:
    """A click's bytes with bytes replaced, inserted or deleted."""
    raw = bytearray(_encode(event))
    for how, where, byte in damage:
        at = where % (len(raw) + 1)
        if how == 0 and at < len(raw):
            raw[at] = byte
        elif how == 1:
            raw.insert(at, byte)
        elif at < len(raw):
            del raw[at]
    _assert_agree(bytes(raw))


@PROPERTIES
@given(st.integers(MAX_EVENT_BYTES - 64, MAX_EVENT_BYTES + 64))
def test_the_size_bound_is_the_same_for_both(size: int) -> None:
    head = b'{"click_id":"c","ts":1.7e9,"user_id":"u","ip":"i","query":"'
    raw = head + b"q" * max(0, size - len(head) - 2) + b'"}'
    _assert_agree(raw)
    verdict, reason = _verdict(decode_click, raw)
    if len(raw) > MAX_EVENT_BYTES:
        assert verdict == "invalid" and "larger than" in reason
