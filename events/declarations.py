"""Every event's fields, declared once (SPEC §1): click, purchase, decision, dead letter
and control message.

Everything else derives from these declarations: the validators in ``events.schemas``,
the worker's typed click decoder (``decode_click`` there), the archive's Arrow schemas
(``events.arrow``), the engine's decision and dead-letter builders, the control messages,
``features.columns``' field lists and the tests' list of decision fields. A field added
here reaches all of them; a test in ``tests/events`` fails when one of them drifts.

Two properties say different things on purpose:

* ``required``: what a reader insists on. An event without the field (or with null) is
  rejected; a required string must also be non-empty.
* ``spec``: the field is in SPEC §1's table, so a builder writes it on every record
  (possibly as null). Fields that slidr adds beyond the table (``late``, ``customer_rfm``,
  ``replay_id``, a dead letter's source ``key``) are written only when given.

A reader is lenient about what a builder always writes: the archive still files a
decision without ``score``, as it did before these declarations.
"""

from __future__ import annotations

import enum
import keyword
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any


class Absent(enum.Enum):
    """The value of a builder argument not given: the field is left out of the record
    (None would be written as null)."""

    ABSENT = "absent"


ABSENT = Absent.ABSENT


class Kind(enum.Enum):
    """What a field holds on the wire (JSON) and, after parsing, in Python."""

    STRING = "string"
    TIME = "time"  # epoch seconds (number) or an RFC 3339 string in; epoch seconds out
    NUMBER = "number"  # a JSON number; float after parsing
    INTEGER = "integer"
    BOOLEAN = "boolean"
    STRINGS = "list of strings"
    STRING_MAP = "object of strings"
    RECORD = "object"  # a nested record with a declaration of its own (Field.record)


@dataclass(frozen=True)
class Field:
    """One field of an event."""

    name: str
    kind: Kind
    required: bool = False  # readers reject an event without it (see the module docstring)
    default: Any = None  # what a reader fills in when the field is absent or null
    default_from: str | None = None  # ... or the value of this other field
    state_key: bool = False  # names feature state: control characters are refused
    spec: bool = True  # in SPEC §1's table: builders always write it
    archived: bool = True  # a column of the archive's Parquet files (else in ``extra``)
    record: EventDeclaration | None = None  # the nested declaration of a RECORD field
    meaning: str = ""

    @property
    def defaulted(self) -> bool:
        return self.default is not None or self.default_from is not None


@dataclass(frozen=True)
class EventDeclaration:
    """An event's fields in their order on the wire."""

    name: str  # how errors name the event ("decision field 'score' must be a number")
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: a field is declared twice: {names}")
        for f in self.fields:
            # Builders take every field as a keyword argument of the same name.
            if not f.name.isidentifier() or keyword.iskeyword(f.name) or f.name[:2] == "__":
                raise ValueError(f"{self.name}: {f.name!r} cannot name a field")
            if (f.kind is Kind.RECORD) != (f.record is not None):
                raise ValueError(f"{self.name}: {f.name!r}: a RECORD field needs a record")
            if f.default_from is not None and f.default_from not in names:
                raise ValueError(f"{self.name}: {f.name!r} defaults to an undeclared field")

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @cached_property
    def spec_names(self) -> tuple[str, ...]:
        """The fields every record carries (SPEC §1's table), in wire order."""
        return tuple(f.name for f in self.fields if f.spec)

    def select(
        self,
        kind: Kind | None = None,
        required: bool | None = None,
        defaulted: bool | None = None,
        state_key: bool | None = None,
    ) -> tuple[Field, ...]:
        """The fields that match every given property, in wire order."""
        return tuple(
            f
            for f in self.fields
            if (kind is None or f.kind is kind)
            and (required is None or f.required == required)
            and (defaulted is None or f.defaulted == defaulted)
            and (state_key is None or f.state_key == state_key)
        )

    def select_names(self, **properties: Any) -> tuple[str, ...]:
        """The names of ``select(**properties)``."""
        return tuple(f.name for f in self.select(**properties))

    @cached_property
    def build(self) -> Callable[..., dict]:
        """A record builder: every field a keyword argument, the record a dict in wire
        order. SPEC fields must be given (a missing or unknown one is a TypeError);
        slidr's additions default to ``ABSENT`` and are left out unless given.

        Compiled once from the declaration, as ``dataclasses`` compiles ``__init__``: a
        call costs one dict display, which matters on the engine's per-click path.
        """
        spec = [f.name for f in self.fields if f.spec]
        extras = [f.name for f in self.fields if not f.spec]
        parameters = ", ".join([*spec, *(f"{name}=__ABSENT" for name in extras)])
        lines = [f"def build_{self.name.replace(' ', '_')}(*, {parameters}):"]
        # Locals start with "__": no field name does (see __post_init__).
        lines.append("    __record = {" + ", ".join(f"{n!r}: {n}" for n in spec) + "}")
        for name in extras:
            lines += [f"    if {name} is not __ABSENT:", f"        __record[{name!r}] = {name}"]
        lines.append("    return __record")
        namespace: dict[str, Any] = {"__ABSENT": ABSENT}
        exec("\n".join(lines), namespace)  # the source holds only checked identifiers
        builder = namespace[f"build_{self.name.replace(' ', '_')}"]
        builder.__doc__ = f"A {self.name} record (events.declarations)."
        return builder


def _string(name: str, **options: Any) -> Field:
    return Field(name, Kind.STRING, **options)


CLICK = EventDeclaration(
    "click",
    (
        _string("click_id", required=True, meaning="unique id of the click"),
        Field("ts", Kind.TIME, required=True, meaning="time of the click"),
        _string("user_id", required=True, state_key=True, meaning="cookie or device id"),
        _string("ip", required=True, state_key=True, meaning="client IPv4/IPv6 address"),
        _string("session_id", default_from="user_id", state_key=True),
        _string("user_agent", default="", meaning="raw User-Agent"),
        Field("logged_in", Kind.BOOLEAN, default=False, meaning="customer signed in"),
        _string("customer_id", meaning="present when logged in"),
        _string("device", meaning="desktop, mobile, app, ...; from user_agent when absent"),
        _string("ad_id"),
        _string("advertiser_id"),
        _string("placement"),
        _string("query"),
        Field("context", Kind.STRING_MAP, meaning="further categorical context"),
    ),
)

PURCHASE = EventDeclaration(
    "purchase",
    (
        _string("purchase_id", required=True),
        Field("ts", Kind.TIME, required=True),
        _string("user_id", required=True),
        _string("customer_id"),
        _string("click_id", meaning="the attributed ad click, when known"),
        Field("amount", Kind.NUMBER, default=0.0),
    ),
)

DECISION = EventDeclaration(
    "decision",
    (
        _string("click_id", required=True),
        Field("ts", Kind.TIME, required=True, meaning="the click's event time"),
        _string("verdict", required=True, meaning="valid or invalid"),
        Field("score", Kind.NUMBER, meaning="probability that the click is robotic"),
        Field("threshold", Kind.NUMBER, meaning="that of the click's slice"),
        _string("slice", meaning="e.g. desktop/logged_in"),
        _string("model_version", meaning="registry version that scored it"),
        Field("reasons", Kind.STRINGS, default=(), meaning="codes behind an invalid verdict"),
        Field("decided_at", Kind.TIME, required=True, meaning="wall clock"),
        Field("degraded", Kind.BOOLEAN, default=False, meaning="a fallback was used"),
        Field("replay", Kind.BOOLEAN, default=False, meaning="published by a replay job"),
        Field("late", Kind.BOOLEAN, spec=False, meaning="behind the feature windows"),
        Field("customer_rfm", Kind.NUMBER, spec=False, meaning="when the customer is known"),
        _string("replay_id", spec=False, archived=False, meaning="the replay job's id"),
    ),
)

DEAD_LETTER_SOURCE = EventDeclaration(
    "dead letter source",
    (
        _string("topic", required=True),
        Field("partition", Kind.INTEGER, meaning="null when the message was never consumed"),
        Field("offset", Kind.INTEGER),
        _string("key", spec=False, meaning="base64 of the message key, when it had one"),
    ),
)

DEAD_LETTER = EventDeclaration(
    "dead letter",
    (
        _string("error", required=True, meaning="why it is here"),
        # Not required: an empty message has an empty original.
        _string("original", meaning="the first bytes, as text or base64 (encoding)"),
        _string("encoding", required=True, meaning="utf-8 or base64"),
        Field("original_bytes", Kind.INTEGER, required=True),
        _string("original_sha256", required=True),
        Field("truncated", Kind.BOOLEAN, required=True, meaning="original is a prefix"),
        Field("source", Kind.RECORD, required=True, record=DEAD_LETTER_SOURCE),
        Field("at", Kind.TIME, required=True, meaning="wall clock"),
    ),
)

# Readers insist only on the version, as the worker always did; builders write all four.
CONTROL = EventDeclaration(
    "control",
    (
        _string("action", meaning="activate or rollback"),
        _string("model_version", required=True),
        _string("reason"),
        Field("at", Kind.TIME, meaning="wall clock"),
    ),
)

EVENTS = (CLICK, PURCHASE, DECISION, DEAD_LETTER, CONTROL)
