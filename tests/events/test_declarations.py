"""Each event is declared once: what derives from the declarations matches them, and the
records built from them keep the shape they had on the topics (pure, no Kafka)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import orjson
import pytest

from events.arrow import ARROW_TYPES, arrow_schema
from events.declarations import (
    ABSENT,
    CLICK,
    CONTROL,
    DEAD_LETTER,
    DEAD_LETTER_SOURCE,
    DECISION,
    EVENTS,
    PURCHASE,
    EventDeclaration,
    Field,
    Kind,
)
from events.schemas import (
    CLICK_REQUIRED,
    CLICK_STRINGS,
    PURCHASE_REQUIRED,
    InvalidEvent,
    parse_click,
    parse_control,
    parse_dead_letter,
    parse_decision,
    parse_purchase,
)
from features.columns import OPTIONAL_STRINGS, STRING_FIELDS, ClickColumns
from stream.archive import SCHEMAS, to_row
from stream.engine import RawMessage, bounded_dead_letter, dead_letter, decision_record
from tests.stream.test_engine_dead_letters import HOSTILE
from tests.stream.worker_harness import DECISION_FIELDS

# -- the declarations themselves ------------------------------------------------------------


def test_declarations_are_well_formed() -> None:
    for event in EVENTS:
        assert event.names and len(set(event.names)) == len(event.names)
        assert event.spec_names == tuple(f.name for f in event.fields if f.spec)
    with pytest.raises(ValueError, match="declared twice"):
        EventDeclaration("x", (Field("a", Kind.STRING), Field("a", Kind.NUMBER)))
    with pytest.raises(ValueError, match="cannot name a field"):
        EventDeclaration("x", (Field("class", Kind.STRING),))
    with pytest.raises(ValueError, match="needs a record"):
        EventDeclaration("x", (Field("a", Kind.RECORD),))
    with pytest.raises(ValueError, match="undeclared field"):
        EventDeclaration("x", (Field("a", Kind.STRING, default_from="b"),))


def test_a_builder_takes_every_spec_field_and_only_declared_ones() -> None:
    given = {name: f"<{name}>" for name in CONTROL.spec_names}
    assert list(CONTROL.build(**given)) == list(CONTROL.spec_names)
    missing = dict(given)
    missing.pop(CONTROL.spec_names[0])
    with pytest.raises(TypeError):
        CONTROL.build(**missing)
    with pytest.raises(TypeError):
        CONTROL.build(**given, campaign="spring")
    with pytest.raises(TypeError):  # keyword-only: a positional value could land anywhere
        CONTROL.build(*given.values())


def test_additions_to_the_spec_are_written_only_when_given() -> None:
    source = {"topic": "clicks", "partition": None, "offset": None}
    assert DEAD_LETTER_SOURCE.build(**source) == source  # null partition is still written
    assert DEAD_LETTER_SOURCE.build(**source, key=ABSENT) == source
    assert DEAD_LETTER_SOURCE.build(**source, key=None) == {**source, "key": None}


# -- validators ------------------------------------------------------------------------------


def test_validators_take_their_field_lists_from_the_declarations() -> None:
    assert tuple(f.name for f in CLICK.fields if f.required) == CLICK_REQUIRED
    strings = tuple(f.name for f in CLICK.fields if f.kind is Kind.STRING and not f.required)
    assert strings == CLICK_STRINGS
    assert tuple(f.name for f in PURCHASE.fields if f.required) == PURCHASE_REQUIRED
    minimal = {f.name: "x" for f in CLICK.fields if f.required and f.kind is Kind.STRING}
    click = parse_click({**minimal, "ts": 1.0})
    for f in CLICK.fields:  # every default the declaration names is applied
        if f.default is not None:
            assert click[f.name] == f.default
        if f.default_from is not None:
            assert click[f.name] == click[f.default_from]
    purchase = parse_purchase({"purchase_id": "p", "ts": 1.0, "user_id": "u"})
    assert set(PURCHASE.names) <= purchase.keys()


@pytest.mark.parametrize("event", [CLICK, PURCHASE, DECISION, CONTROL, DEAD_LETTER])
def test_every_required_field_is_required(event: EventDeclaration) -> None:
    parse = {
        "click": parse_click,
        "purchase": parse_purchase,
        "decision": parse_decision,
        "control": parse_control,
        "dead letter": parse_dead_letter,
    }[event.name]
    full = _example(event)
    parse(orjson.dumps(full))
    for f in event.fields:
        if f.required:
            with pytest.raises(InvalidEvent, match=repr(f.name)):
                parse(orjson.dumps({k: v for k, v in full.items() if k != f.name}))


def _example(event: EventDeclaration) -> dict:
    """A valid record with every field of ``event`` given."""
    values = {
        Kind.STRING: "x",
        Kind.TIME: 1_762_041_600.0,
        Kind.NUMBER: 0.5,
        Kind.INTEGER: 3,
        Kind.BOOLEAN: True,
        Kind.STRINGS: ["a"],
        Kind.STRING_MAP: {"k": "v"},
    }
    return {
        f.name: _example(f.record) if f.record is not None else values[f.kind] for f in event.fields
    }


# -- the archive's Arrow schemas -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "event"), [("clicks", CLICK), ("purchases", PURCHASE), ("decisions", DECISION)]
)
def test_every_archive_column_is_a_declared_field(kind: str, event: EventDeclaration) -> None:
    schema = SCHEMAS[kind]
    archived = [f for f in event.fields if f.archived]
    assert schema.names == [f.name for f in archived] + ["extra"]
    for f in archived:
        assert schema.field(f.name).type == ARROW_TYPES[f.kind], f.name
    assert schema.equals(arrow_schema(event, extra="extra"))


def test_a_decision_field_kept_out_of_the_columns_lands_in_extra() -> None:
    decision = parse_decision(_example(DECISION))
    row = to_row("decisions", decision)
    kept_out = [f.name for f in DECISION.fields if not f.archived]
    assert kept_out and orjson.loads(row["extra"]) == {n: decision[n] for n in kept_out}


# -- features.columns ----------------------------------------------------------------------


def test_click_columns_hold_the_declared_fields() -> None:
    strings = [f for f in CLICK.fields if f.kind is Kind.STRING]
    assert tuple(f.name for f in strings) == STRING_FIELDS
    assert tuple(f.name for f in strings if not f.required and not f.defaulted) == OPTIONAL_STRINGS
    # A column of its own for each field every parsed click has (required or defaulted).
    always = [f.name for f in CLICK.fields if f.required or f.defaulted]
    own_columns = [f.name for f in dataclasses.fields(ClickColumns)]
    assert own_columns[: len(always)] == always
    assert own_columns[len(always) :] == ["optional", "context", "extra"]


def test_a_click_row_is_what_the_parser_gives() -> None:
    n = 2
    cols = ClickColumns(
        click_id=np.array(["c1", "c2"], dtype=object),
        ts=np.array([1.0, 2.0]),
        user_id=np.array(["u1", "u2"], dtype=object),
        ip=np.array(["10.0.0.1", "10.0.0.2"], dtype=object),
        session_id=np.array(["s1", "u2"], dtype=object),
        user_agent=np.array(["ua", ""], dtype=object),
        logged_in=np.array([True, False]),
        optional={name: np.array(["v", None], dtype=object) for name in OPTIONAL_STRINGS},
        context={"publisher": np.array(["p", None], dtype=object)},
    )
    for i in range(n):
        row = cols.row(i)
        assert parse_click(orjson.dumps(row)) == row


# -- the engine's decisions ------------------------------------------------------------------


def _decision(**extras) -> dict:
    features = np.zeros(40, dtype=np.float32)
    return decision_record(
        "c1",
        1_762_041_600.0,
        0.25,
        0.5,
        "desktop/anonymous",
        "v0001",
        features,
        1_762_041_601.5,
        **extras,
    )


def test_a_built_decision_carries_every_spec_field_and_parses_back() -> None:
    assert DECISION.spec_names == DECISION_FIELDS
    for extras in ({}, {"late": False, "customer_rfm": 0.7}, {"late": True, "customer_rfm": None}):
        decision = _decision(**extras)
        assert list(decision) == [n for n in DECISION.names if n in decision]
        assert set(DECISION.spec_names) <= decision.keys()
        assert parse_decision(orjson.dumps(decision)) == {**decision, **extras}


def test_a_decision_keeps_its_shape_on_the_topic() -> None:
    # The bytes the engine published before the declarations; a change here changes what
    # billing consumers, the archive and replays read.
    assert orjson.dumps(_decision(late=False, customer_rfm=None)) == (
        b'{"click_id":"c1","ts":1762041600.0,"verdict":"valid","score":0.25,"threshold":0.5,'
        b'"slice":"desktop/anonymous","model_version":"v0001","reasons":[],'
        b'"decided_at":1762041601.5,"degraded":false,"replay":false,"late":false,'
        b'"customer_rfm":null}'
    )
    assert b'"customer_rfm"' not in orjson.dumps(_decision(late=False))


# -- dead letters and control messages -------------------------------------------------------


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_dead_letter_of_a_hostile_message_validates(name: str) -> None:
    raw = HOSTILE[name]
    try:
        parse_click(raw)
        reason = "accepted"
    except InvalidEvent as exc:
        reason = str(exc)
    letter = parse_dead_letter(dead_letter(RawMessage(raw, "clicks", 5, 1234), reason))
    assert set(letter) == set(DEAD_LETTER.spec_names)
    assert set(letter["source"]) == set(DEAD_LETTER_SOURCE.spec_names)


def test_a_dead_letter_of_an_unproducible_message_validates_with_its_key() -> None:
    letter = bounded_dead_letter(b"{}", "too large", "decisions", None, None, b"c1")
    record = parse_dead_letter(letter)
    assert record["source"] == {
        "topic": "decisions",
        "partition": None,
        "offset": None,
        "key": "YzE=",
    }


def test_a_dead_letter_keeps_its_shape_on_the_topic() -> None:
    letter = dead_letter(RawMessage(b"{}", "clicks", 0, 7), "missing required field 'click_id'")
    assert re.sub(rb'"at":[0-9.e+-]+', b'"at":0', letter) == (
        b'{"error":"missing required field \'click_id\'","original":"{}","encoding":"utf-8",'
        b'"original_bytes":2,"original_sha256":'
        b'"44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",'
        b'"truncated":false,"source":{"topic":"clicks","partition":0,"offset":7},"at":0}'
    )


def test_dead_letter_and_control_readers_say_what_is_wrong() -> None:
    letter = orjson.loads(dead_letter(RawMessage(b"x", "clicks", 0, 1), "not JSON"))
    with pytest.raises(InvalidEvent, match="dead letter source field 'offset' must be an integer"):
        parse_dead_letter({**letter, "source": {**letter["source"], "offset": "1"}})
    with pytest.raises(InvalidEvent, match="dead letter field 'truncated' must be a boolean"):
        parse_dead_letter({**letter, "truncated": "no"})
    message = CONTROL.build(action="activate", model_version="v0002", reason="r", at=1.0)
    assert parse_control(orjson.dumps(message)) == message
    with pytest.raises(InvalidEvent, match="'model_version' must be a non-empty string"):
        parse_control(orjson.dumps({**message, "model_version": 2}))
    with pytest.raises(InvalidEvent, match="control message must be a JSON object"):
        parse_control(b"[]")
