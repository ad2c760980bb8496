"""Event validation (SPEC §1): clicks, purchases, decisions, dead letters, control messages.

Pure functions, no Kafka: the stream worker, ``slidr produce``, the archive and the
offline loaders all validate with these, so a click rejected by one is rejected by all.
A rejected event raises ``InvalidEvent`` whose message is the reason written to the
dead-letter topic. The fields and their types come from ``events.declarations``; this
module says how each kind of field is checked and worded.

``parse_click`` reads a click from anything (bytes, text, a dict); ``decode_click`` is
the worker's faster path for message bytes, with the same verdicts (see its comment).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, NoReturn

import msgspec
import orjson

from events.declarations import (
    CLICK,
    CONTROL,
    DEAD_LETTER,
    DECISION,
    PURCHASE,
    EventDeclaration,
    Field,
    Kind,
)
from events.errors import SlidrError

MAX_EVENT_BYTES = 64 * 1024  # larger payloads are rejected whole, before parsing
MAX_FIELD_CHARS = 4096  # longest accepted string value (user agents run to ~500)
LATEST_TS = 32503680000.0  # year 3000: a later (or negative) event time is an error

# The click's fields by how they are checked, computed once (parse_click runs per click).
CLICK_REQUIRED = CLICK.select_names(required=True)
CLICK_STRINGS = CLICK.select_names(kind=Kind.STRING, required=False)
_CLICK_TIMES = CLICK.select_names(kind=Kind.TIME)
_CLICK_IDS = CLICK.select_names(kind=Kind.STRING, required=True)
_CLICK_STRING_DEFAULTS = tuple(
    (f.name, f.default, f.default_from) for f in CLICK.select(kind=Kind.STRING, defaulted=True)
)
# Ids that name feature state: the shared store's batch format separates fields with
# ASCII control characters, so an id holding one would count under another entity.
_STATE_KEY_FIELDS = CLICK.select_names(state_key=True)
_CLICK_BOOLEANS = tuple((f.name, f.default) for f in CLICK.select(kind=Kind.BOOLEAN))
_CLICK_MAPS = CLICK.select_names(kind=Kind.STRING_MAP)
PURCHASE_REQUIRED = PURCHASE.select_names(required=True)
_PURCHASE_TIMES = PURCHASE.select_names(kind=Kind.TIME)
_PURCHASE_STRINGS = tuple((f.name, f.required) for f in PURCHASE.select(kind=Kind.STRING))
_PURCHASE_NUMBERS = tuple((f.name, f.default) for f in PURCHASE.select(kind=Kind.NUMBER))
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


class InvalidEvent(SlidrError, ValueError):
    """An event that does not match its schema; the message says why."""


def parse_ts(value: Any, field: str = "ts") -> float:
    """Event time as epoch seconds from a number or an RFC 3339 string."""
    kind = type(value)
    if kind is float or kind is int:  # the common case first (bool is not int here)
        ts = float(value)
    elif kind is bool:
        raise InvalidEvent(f"{field} must be a number or an RFC 3339 string, got a boolean")
    elif isinstance(value, int | float):
        ts = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidEvent(f"{field} is not an RFC 3339 time: {value[:64]!r}") from None
        if parsed.tzinfo is None:
            raise InvalidEvent(f"{field} has no time zone: {value[:64]!r}")
        ts = parsed.timestamp()
    else:
        raise InvalidEvent(f"{field} must be a number or an RFC 3339 string")
    if not math.isfinite(ts) or ts < 0 or ts > LATEST_TS:
        raise InvalidEvent(f"{field} is out of range: {value!r}")
    return ts


def check_not_ahead(ts: float, now: float, max_skew_s: float) -> None:
    """Raise ``InvalidEvent`` when event time ``ts`` is more than ``max_skew_s`` ahead of
    ``now`` (the caller's wall clock, epoch seconds). Only the future is bounded: a click
    from any time in the past passes, so a late click or a replayed one is never refused.
    """
    if ts - now > max_skew_s:
        raise InvalidEvent(
            f"ts is {ts - now:.1f} s ahead of the worker's clock, more than "
            f"SLIDR_MAX_FUTURE_SKEW_S ({max_skew_s:g} s)"
        )


def _check_string(value: Any, label: str, required: bool = False) -> None:
    """Raise ``InvalidEvent`` unless ``value`` is a string of at most ``MAX_FIELD_CHARS``
    (and not empty when ``required``). Every string error is worded here; the per-click
    path tests the common case inline and calls this only when that test fails."""
    if not isinstance(value, str):
        raise InvalidEvent(f"{label} must be a string, got {type(value).__name__}")
    if required and not value:
        raise InvalidEvent(f"{label} must not be empty")
    if len(value) > MAX_FIELD_CHARS:
        raise InvalidEvent(f"{label} is longer than {MAX_FIELD_CHARS} characters")


def _string(event: dict, name: str, required: bool) -> str | None:
    value = event.get(name)
    if value is None:
        if required:
            raise InvalidEvent(f"missing required field {name!r}")
        return None
    _check_string(value, f"field {name!r}", required)
    return value


def load_object(
    raw: bytes | str | dict | None, what: str = "event", max_bytes: int = MAX_EVENT_BYTES
) -> dict:
    """A message value as a JSON object (a dict passes through); ``InvalidEvent`` otherwise.

    ``what`` names the value in the error ("event", "decision").
    """
    if isinstance(raw, dict):
        return raw
    if raw is None:  # a Kafka message without a value (e.g. a tombstone)
        raise InvalidEvent("empty message (no value)")
    if len(raw) > max_bytes:
        raise InvalidEvent(f"{what} is larger than {max_bytes} bytes ({len(raw)})")
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise InvalidEvent(f"{what} must be a JSON object, got {type(event).__name__}")
    return event


def parse_click(raw: bytes | str | dict | None) -> dict:
    """A validated click dict with defaults applied (``ts`` as epoch seconds).

    Unknown fields are kept; optional fields given as null are left out; ``session_id``
    defaults to ``user_id``, ``user_agent`` to "", ``logged_in`` to false.
    """
    event = load_object(raw)
    for name in CLICK_REQUIRED:
        if name not in event or event[name] is None:
            raise InvalidEvent(f"missing required field {name!r}")
    click = dict(event) if event is raw else event  # never change a caller's dict
    for name in _CLICK_TIMES:
        click[name] = parse_ts(event[name], name)
    # Every click passes here: the common case is tested inline (see _check_string).
    for name in _CLICK_IDS:
        value = event[name]
        if type(value) is not str or not value or len(value) > MAX_FIELD_CHARS:
            _check_string(value, f"field {name!r}", required=True)
    for name in CLICK_STRINGS:
        value = event.get(name)
        if value is None:
            click.pop(name, None)
        elif type(value) is not str or len(value) > MAX_FIELD_CHARS:
            _check_string(value, f"field {name!r}")
    for name, default, default_from in _CLICK_STRING_DEFAULTS:
        click[name] = click.get(name) or (default if default_from is None else click[default_from])
    for name in _STATE_KEY_FIELDS:
        value = click[name]
        # isprintable() is a fast C check that passes almost every id; what it rejects
        # beyond ASCII control characters (e.g. a zero-width space) is allowed.
        if not value.isprintable() and (control := _CONTROL_CHARACTER.search(value)):
            raise InvalidEvent(f"field {name!r} contains a control character ({control.group()!r})")
    for name, default in _CLICK_BOOLEANS:
        value = event.get(name)
        if value is None:
            value = default
        elif not isinstance(value, bool):
            raise InvalidEvent(f"field {name!r} must be a boolean, got {type(value).__name__}")
        click[name] = value
    for name in _CLICK_MAPS:
        mapping = event.get(name)
        if mapping is None:
            click.pop(name, None)
            continue
        if not isinstance(mapping, dict):
            raise InvalidEvent(f"field {name!r} must be an object of strings")
        for key, value in mapping.items():
            if value is not None and (type(value) is not str or len(value) > MAX_FIELD_CHARS):
                _check_string(value, f"{name}.{key}")
        click[name] = {k: v for k, v in mapping.items() if v is not None}
    return click


# -- the worker's click decoder -----------------------------------------------------------
#
# decode_click returns what parse_click returns and raises what it raises (tested on odd
# JSON in every field and on thousands of damaged clicks), in about 70% of the time.
# Decode, validate and defaults of one simulated day (20,040 clicks, 1% spoiled as dead
# letters), medians of 7 alternating rounds, seven sittings on a busy 2-core host:
# parse_click 6.95-8.66 µs a message, decode_click 4.59-6.33 µs, 0.66-0.79 of
# parse_click's time in each sitting (median 0.70);
# `python -m tests.events.bench_click_decoder`. msgspec checks each declared field's
# type, emptiness and length while it decodes; a message it refuses (bad JSON, a wrong
# type, an unknown field) goes through parse_click, whose reason the dead letter
# carries. Unknown fields are refused rather than skipped because msgspec skips them
# without checking what orjson refuses (invalid UTF-8, a number beyond a float, deep
# nesting); they are rare on the clicks topic, so that slower path is the exception.

_TEXT = Annotated[str, msgspec.Meta(max_length=MAX_FIELD_CHARS)]
_WIRE_TYPES: dict[Kind, Any] = {
    Kind.STRING: _TEXT,
    Kind.TIME: float | str,  # a JSON integer arrives as a float
    Kind.NUMBER: float,
    Kind.BOOLEAN: bool,
    Kind.STRING_MAP: dict[str, _TEXT | None],
}


def _wire_field(field: Field) -> tuple:
    if field.required:
        if field.kind is Kind.STRING:
            return (
                field.name,
                Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_FIELD_CHARS)],
            )
        return (field.name, _WIRE_TYPES[field.kind])
    return (field.name, _WIRE_TYPES[field.kind] | None, None)


_ClickWire = msgspec.defstruct(
    "ClickWire", [_wire_field(f) for f in CLICK.fields], forbid_unknown_fields=True
)
_decode_wire_click = msgspec.json.Decoder(_ClickWire).decode
_CLICK_OPTIONAL_STRINGS = CLICK.select_names(kind=Kind.STRING, required=False, defaulted=False)


def decode_click(raw: bytes | str | dict | None) -> dict:
    """The validated click of a message value, exactly as ``parse_click`` gives it (or
    the ``InvalidEvent`` it raises), decoded by msgspec: the worker's per-click path."""
    if type(raw) is not bytes or len(raw) > MAX_EVENT_BYTES:
        return parse_click(raw)
    try:
        click = msgspec.structs.asdict(_decode_wire_click(raw))
    except (msgspec.DecodeError, RecursionError):
        return parse_click(raw)  # for its reason (or its acceptance: an unknown field)
    for name in _CLICK_TIMES:
        ts = click[name]
        if type(ts) is str:
            click[name] = parse_ts(ts, name)  # the string as sent, so the same reason
        elif not 0.0 <= ts <= LATEST_TS:
            return parse_click(raw)  # whose reason quotes the number as it was sent
    for name in _CLICK_OPTIONAL_STRINGS:
        if click[name] is None:
            del click[name]
    for name, default, default_from in _CLICK_STRING_DEFAULTS:
        click[name] = click[name] or (default if default_from is None else click[default_from])
    for name in _STATE_KEY_FIELDS:
        value = click[name]
        if not value.isprintable() and (control := _CONTROL_CHARACTER.search(value)):
            raise InvalidEvent(f"field {name!r} contains a control character ({control.group()!r})")
    for name, default in _CLICK_BOOLEANS:
        if click[name] is None:
            click[name] = default
    for name in _CLICK_MAPS:
        mapping = click[name]
        if mapping is None:
            del click[name]
        else:
            click[name] = {k: v for k, v in mapping.items() if v is not None}
    return click


def parse_purchase(raw: bytes | str | dict | None) -> dict:
    """A validated purchase dict: every declared field present (None when absent),
    ``ts`` as epoch seconds, ``amount`` as float or 0."""
    event = load_object(raw)
    purchase = dict(event)
    for name in PURCHASE_REQUIRED:
        if name not in event or event[name] is None:
            raise InvalidEvent(f"missing required field {name!r}")
    for name in _PURCHASE_TIMES:
        purchase[name] = parse_ts(event[name], name)
    for name, required in _PURCHASE_STRINGS:
        purchase[name] = _string(event, name, required)
    for name, default in _PURCHASE_NUMBERS:
        value = event.get(name)
        if value is None:
            value = default
        if value is not None:
            if not _is_number(value) or not math.isfinite(value):
                raise InvalidEvent(f"field {name!r} must be a finite number")
            value = float(value)
        purchase[name] = value
    return purchase


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


class RecordReader:
    """Checks records of one declaration (decisions, dead letters, control messages).

    Readers of what slidr itself writes: lenient where the declaration allows, strict
    on types. Fields are checked kind by kind (required strings, times, numbers,
    optional strings, lists, booleans, integers, objects), so the first error named is
    the same whatever the field order. Each field's check is built once, here.
    """

    def __init__(
        self,
        declaration: EventDeclaration,
        what: str | None = None,
        max_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self.declaration = declaration
        self.what = what or declaration.name
        self.max_bytes = max_bytes
        self.label = f"{declaration.name} field"
        order = (Kind.TIME, Kind.NUMBER, Kind.STRING, Kind.STRINGS, Kind.BOOLEAN, Kind.INTEGER)
        required_strings = declaration.select(kind=Kind.STRING, required=True)
        rest = [
            f for kind in order for f in declaration.select(kind=kind) if f not in required_strings
        ]
        rest += declaration.select(kind=Kind.STRING_MAP) + declaration.select(kind=Kind.RECORD)
        # (name, check, what to do when absent: raise this reason, or fill in a default)
        self.plan = tuple(
            (f.name, self._check_of(f), self._missing_reason(f), f.default)
            for f in (*required_strings, *rest)
        )

    def read(self, raw: bytes | str | dict | None) -> dict:
        """A checked copy of the record: times as epoch seconds, defaults filled in."""
        return self.check(load_object(raw, self.what, self.max_bytes))

    def check(self, event: dict) -> dict:
        record = dict(event)
        get = event.get
        for name, check, missing_reason, default in self.plan:
            value = get(name)
            if value is None:
                if missing_reason is not None:
                    raise InvalidEvent(missing_reason)
                if default is not None:
                    record[name] = _copy(default)
            else:
                record[name] = check(value)
        return record

    def _missing_reason(self, field: Field) -> str | None:
        if not field.required:
            return None
        if field.kind is Kind.STRING:
            return f"{self.label} {field.name!r} must be a non-empty string"
        return f"missing required field {field.name!r}"

    def _check_of(self, field: Field) -> Callable[[Any], Any]:
        """A function that returns a present value as the record holds it, or raises."""
        name, kind, required = field.name, field.kind, field.required
        wrong = f"{self.label} {name!r} must be"

        def fail(what: str) -> NoReturn:
            raise InvalidEvent(f"{wrong} {what}")

        if kind is Kind.TIME:
            return lambda value: parse_ts(value, name)
        if kind is Kind.RECORD:
            assert field.record is not None
            nested = RecordReader(field.record)
            return lambda value: (
                nested.check(value) if isinstance(value, dict) else fail("an object")
            )
        if kind is Kind.STRINGS:
            default = field.default

            def strings(value: Any) -> Any:
                if not value:  # an empty value reads as the default, as it always did
                    return _copy(default) if default is not None else value
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    fail("a list of strings")
                return value

            return strings
        accepts: Callable[[Any], bool]
        if kind is Kind.STRING:
            accepts = (lambda v: isinstance(v, str) and v != "") if required else _is_string
            expected = "a non-empty string" if required else "a string"
        elif kind is Kind.NUMBER:
            accepts, expected = _is_number, "a number"
        elif kind is Kind.INTEGER:
            accepts, expected = _is_integer, "an integer"
        elif kind is Kind.BOOLEAN:
            accepts, expected = _is_boolean, "a boolean"
        elif kind is Kind.STRING_MAP:
            accepts, expected = _is_string_map, "an object of strings"
        else:
            raise ValueError(f"{self.label} {name!r}: no check for {kind}")
        return lambda value: value if accepts(value) else fail(expected)


def _is_string(value: Any) -> bool:
    return isinstance(value, str)


def _is_integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def _is_boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _is_string_map(value: Any) -> bool:
    return isinstance(value, dict) and all(v is None or isinstance(v, str) for v in value.values())


def _copy(default: Any) -> Any:
    """A default as a fresh value: a list for a tuple (records hold JSON lists)."""
    return list(default) if isinstance(default, tuple) else default


_DECISIONS = RecordReader(DECISION)
# A dead letter quotes up to 16 KB of its message, escaped: larger than an event may be.
_DEAD_LETTERS = RecordReader(DEAD_LETTER, max_bytes=1024 * 1024)
_CONTROL_MESSAGES = RecordReader(CONTROL, "control message")


def parse_decision(raw: bytes | str | dict | None) -> dict:
    """A decision dict checked against its declaration (``ts`` and ``decided_at`` as
    epoch seconds, ``reasons`` a list, ``degraded`` and ``replay`` booleans).

    Raises ``InvalidEvent`` when it is not a JSON object, lacks ``click_id``, ``ts``,
    ``verdict`` or ``decided_at``, or has a wrongly typed field.
    """
    return _DECISIONS.read(raw)


def parse_dead_letter(raw: bytes | str | dict | None) -> dict:
    """A dead-letter record checked against its declaration."""
    return _DEAD_LETTERS.read(raw)


def parse_control(raw: bytes | str | dict | None) -> dict:
    """A control message checked against its declaration: ``model_version`` required."""
    return _CONTROL_MESSAGES.read(raw)
