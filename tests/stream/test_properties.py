"""Property-based tests (hypothesis) of what the worker writes: dead letters, and the
rows it sends the shared store.

- A dead letter of any message (up to a few MB, any bytes) is valid JSON within
  ``MAX_DEAD_LETTER_BYTES``, reads back as a dead letter, and carries the original's
  length and SHA-256, a prefix of it, the reason and the source.
- The shared store's batch format separates fields with ASCII control characters: for
  any click the worker accepts, the rows it builds are read back field for field by
  the script's parsing, and the keys they name cannot mix two entities.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import orjson
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from events.schemas import InvalidEvent, decode_click, parse_dead_letter
from features.definitions import combo_entities_function, combo_plan, state_plan
from features.windows import COMBOS
from stream.engine import (
    DEAD_LETTER_ERROR_CHARS,
    DEAD_LETTER_ORIGINAL_BYTES,
    MAX_DEAD_LETTER_BYTES,
    bounded_dead_letter,
)
from stream.state import _rows_arg

PROPERTIES = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_KAFKA_MESSAGE_MAX_BYTES = 1_000_000  # the broker's and producer's default bound


# -- dead letters -------------------------------------------------------------------------


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """Any bytes up to 3 MB: a drawn pattern repeated to a drawn length, so large
    messages cost nothing to draw. Patterns include control bytes (JSON escapes each as
    six characters), invalid UTF-8 and multi-byte characters cut by the bound."""
    size = draw(
        st.one_of(
            st.integers(0, 64),
            st.integers(DEAD_LETTER_ORIGINAL_BYTES - 8, DEAD_LETTER_ORIGINAL_BYTES + 8),
            st.integers(0, 3 * 1024 * 1024),
        )
    )
    pattern = draw(
        st.one_of(
            st.binary(min_size=1, max_size=32),
            st.sampled_from([b"\x01", b"\x00\x1f", b'"\\', "é😀€".encode(), b"\xff", b"a"]),
            st.text(min_size=1, max_size=8).map(lambda t: t.encode("utf-8")),
        )
    )
    return (pattern * (size // len(pattern) + 1))[:size]


# A reason or topic may be empty (the writer then names it unspecified): the reader,
# which refuses an empty one, must still read every dead letter.
_ERRORS = st.one_of(
    st.text(max_size=64),
    st.text(alphabet=st.sampled_from(["\x00", "\ud800", "é", "x", '"']), min_size=1, max_size=4000),
)


@settings(PROPERTIES, max_examples=60)
@given(
    messages(),
    _ERRORS,
    st.text(max_size=300),
    st.none() | st.integers(0, 2**31 - 1),
    st.none() | st.integers(0, 2**63 - 1),
    st.none() | st.binary(max_size=400),
)
def test_a_dead_letter_always_fits_and_identifies_its_message(
    raw: bytes,
    error: str,
    topic: str,
    partition: int | None,
    offset: int | None,
    key: bytes | None,
) -> None:
    record = bounded_dead_letter(raw, error, topic, partition, offset, key)
    assert len(record) <= MAX_DEAD_LETTER_BYTES < _KAFKA_MESSAGE_MAX_BYTES
    letter = parse_dead_letter(record)  # valid JSON, and a dead letter by its declaration
    assert json.loads(record) == orjson.loads(record)
    assert letter["original_bytes"] == len(raw)
    assert letter["original_sha256"] == hashlib.sha256(raw).hexdigest()
    assert letter["truncated"] == (len(raw) > DEAD_LETTER_ORIGINAL_BYTES)
    original = letter.get("original") or ""
    if letter["encoding"] == "base64":
        assert base64.b64decode(original) == raw[:DEAD_LETTER_ORIGINAL_BYTES]
    else:
        assert letter["encoding"] == "utf-8"
        prefix = original.encode("utf-8")
        assert raw.startswith(prefix)
        # Only a character cut by the bound is left out.
        assert len(prefix) >= DEAD_LETTER_ORIGINAL_BYTES - 3 or prefix == raw
    error = error or "unspecified error"
    reason = error.encode("utf-8", "replace").decode("utf-8")
    if len(error) > DEAD_LETTER_ERROR_CHARS:
        cut = error[:DEAD_LETTER_ERROR_CHARS].encode("utf-8", "replace").decode("utf-8")
        assert letter["error"] == cut + "…"
    else:
        assert letter["error"] == reason
    source = letter["source"]
    assert source["topic"] == (topic or "unknown topic")[:256]
    assert source.get("partition") == partition
    assert source.get("offset") == offset
    if key is not None:
        assert base64.b64decode(source["key"]) == key[:256]


# -- the shared store's rows --------------------------------------------------------------

_IDS = st.one_of(
    st.text(min_size=1, max_size=40),
    st.text(
        alphabet=st.sampled_from(["\x1d", "\x1e", "\x1f", "|", ":", '"', "[", "\\", "é", "a"]),
        min_size=1,
        max_size=12,
    ),
    st.text(min_size=33, max_size=80),  # long enough to enter combinations as a digest
)


@st.composite
def accepted_clicks(draw: st.DrawFn) -> dict:
    """A click as the worker accepts it (``decode_click`` of its bytes), ids drawn from
    any text, separators included; those the worker rejects are not examples."""
    event: dict[str, Any] = {
        "click_id": draw(_IDS),
        "ts": draw(st.floats(1.5e9, 1.75e9)),
        "user_id": draw(_IDS),
        "ip": draw(_IDS),
    }
    if draw(st.booleans()):
        event["session_id"] = draw(_IDS)
    if draw(st.booleans()):
        event["context"] = {"app": draw(_IDS)}
    try:
        return decode_click(json.dumps(event).encode())
    except InvalidEvent:
        assume(False)  # not an example: the worker dead-letters it
        raise


_USER_PLAN, _IP_PLAN = state_plan("user", 0.0), state_plan("ip", 0.0)
_COMBO_PLANS = tuple(combo_plan(c, 0.0) for c in COMBOS)
_combo_entities = combo_entities_function(COMBOS)


def _rows_of(click: dict) -> list[tuple[str, float, tuple[str, ...]]]:
    """The click's rows as ``ClickFeaturizer.featurize`` builds them: user, IP, and one
    per combination."""
    user_id, ip, ts = click["user_id"], click["ip"], click["ts"]
    session = click.get("session_id") or user_id
    rows: list[tuple[str, float, tuple[str, ...]]] = [
        ("u:" + user_id, ts, (ip, session)),
        ("i:" + ip, ts, (user_id, session)),
    ]
    rows.extend((entity, ts, ()) for entity in _combo_entities(click))
    return rows


def _script_fields(text: str, nrows: int, width: int) -> list[list[str]]:
    """The rows argument split as the Lua script splits it (``find`` of \\x1f from the
    last position, ``width`` fields a row)."""
    rows, pos = [], 0
    for _ in range(nrows):
        fields = []
        for _ in range(width):
            cut = text.find("\x1f", pos)
            if cut >= 0:
                fields.append(text[pos:cut])
                pos = cut + 1
            else:
                fields.append(text[pos:])
                pos = len(text) + 1
        rows.append(fields)
    return rows


def _field_prefixes() -> list[str]:
    prefixes = []
    for plan in (_USER_PLAN, _IP_PLAN, *_COMBO_PLANS):
        prefixes += [prefix for _, prefix, _ in plan.counts]
        prefixes += [prefix for _, prefix, _ in plan.distincts]
        if plan.last_seen:
            prefixes.append("last:")
    return prefixes


@PROPERTIES
@given(st.lists(accepted_clicks(), min_size=1, max_size=6))
def test_rows_of_accepted_clicks_read_back_field_for_field(clicks: list[dict]) -> None:
    rows = [row for click in clicks for row in _rows_of(click)]
    for width in (2, 4):
        group = [row for row in rows if len(row[2]) == width - 2]
        if not group:
            continue
        text = _rows_arg(group, width)
        text.encode("utf-8")  # redis-py sends arguments as strict UTF-8
        expected = [[repr(ts), entity, *members] for entity, ts, members in group]
        assert _script_fields(text, len(group), width) == expected


@PROPERTIES
@given(st.lists(accepted_clicks(), min_size=2, max_size=6))
def test_state_keys_never_mix_entities(clicks: list[dict]) -> None:
    """The script's key is ``prefix .. entity .. '|' .. field``: with no '|' in any
    field name, the last '|' splits a key back into its entity and field, so two
    entities never share a key."""
    prefixes = _field_prefixes()
    assert prefixes and not any("|" in p or "\x1f" in p for p in prefixes)
    owners: dict[str, tuple[str, ...]] = {}
    for click in clicks:
        user_id, ip = click["user_id"], click["ip"]
        context = click.get("context") or {}
        values = (ip, context.get("app") or "")
        for entity, identity in [
            ("u:" + user_id, ("user", user_id)),
            ("i:" + ip, ("ip", ip)),
            (_combo_entities(click)[0], ("ip_app", *values)),
        ]:
            assert owners.setdefault(entity, identity) == identity, (entity, identity)
            for prefix in prefixes:
                key = "slidr:" + entity + "|" + prefix + "12345"
                assert key[len("slidr:") :].rsplit("|", 1) == [entity, prefix + "12345"]


@PROPERTIES
@given(st.text(max_size=40), st.text(max_size=40), st.text(max_size=40), st.text(max_size=40))
def test_combination_entities_tell_values_apart(a: str, b: str, c: str, d: str) -> None:
    """Different values give different combination entities (a digest stands in for a
    long value, and no short value looks like one); none holds a control character."""
    first = _combo_entities({"ip": a, "context": {"app": b}})[0]
    second = _combo_entities({"ip": c, "context": {"app": d}})[0]
    assert (first == second) == ((a, b) == (c, d))
    assert not any(ord(ch) < 0x20 for ch in first)
