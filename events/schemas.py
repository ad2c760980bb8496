"""Event schemas (SPEC §1): parsing and validation of clicks and purchases.

Pure functions, no Kafka: the stream worker, ``slidr produce`` and the offline loaders
all validate with these, so a click rejected by one is rejected by all. A rejected event
raises ``InvalidEvent`` whose message is the reason written to the dead-letter topic.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any

import orjson

MAX_EVENT_BYTES = 64 * 1024  # larger payloads are rejected whole, before parsing
MAX_FIELD_CHARS = 4096  # longest accepted string value (user agents run to ~500)

CLICK_REQUIRED = ("click_id", "ts", "user_id", "ip")
CLICK_STRINGS = (
    "session_id",
    "user_agent",
    "customer_id",
    "device",
    "ad_id",
    "advertiser_id",
    "placement",
    "query",
)
PURCHASE_REQUIRED = ("purchase_id", "ts", "user_id")
_CLICK_ID_FIELDS = ("click_id", "user_id", "ip")
# Ids that name feature state: the shared store's batch format separates fields with
# ASCII control characters, so an id holding one would count under another entity.
_STATE_KEY_FIELDS = ("user_id", "ip", "session_id")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class InvalidEvent(ValueError):
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
    if not math.isfinite(ts) or ts < 0 or ts > 32503680000:  # 0 .. year 3000
        raise InvalidEvent(f"{field} is out of range: {value!r}")
    return ts


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


def load_object(raw: bytes | str | dict | None, what: str = "event") -> dict:
    """A message value as a JSON object (a dict passes through); ``InvalidEvent`` otherwise.

    ``what`` names the value in the error ("event", "decision").
    """
    if isinstance(raw, dict):
        return raw
    if raw is None:  # a Kafka message without a value (e.g. a tombstone)
        raise InvalidEvent("empty message (no value)")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"{what} is larger than {MAX_EVENT_BYTES} bytes ({len(raw)})")
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"not valid JSON: {exc}") from None
    if not isinstance(event, dict):
        raise InvalidEvent(f"{what} must be a JSON object, got {type(event).__name__}")
    return event


def parse_click(raw: bytes | str | dict | None) -> dict:
    """A validated click dict with defaults applied (``ts`` as epoch seconds).

    Unknown fields are kept; ``session_id`` defaults to ``user_id``, ``user_agent`` to "",
    ``logged_in`` to false.
    """
    event = load_object(raw)
    for name in CLICK_REQUIRED:
        if name not in event or event[name] is None:
            raise InvalidEvent(f"missing required field {name!r}")
    click = dict(event) if event is raw else event  # never change a caller's dict
    click["ts"] = parse_ts(event["ts"])
    # Every click passes here: the common case is tested inline (see _check_string).
    for name in _CLICK_ID_FIELDS:
        value = event[name]
        if type(value) is not str or not value or len(value) > MAX_FIELD_CHARS:
            _check_string(value, f"field {name!r}", required=True)
    for name in CLICK_STRINGS:
        value = event.get(name)
        if value is None:
            click.pop(name, None)
        elif type(value) is not str or len(value) > MAX_FIELD_CHARS:
            _check_string(value, f"field {name!r}")
    click["session_id"] = click.get("session_id") or click["user_id"]
    for name in _STATE_KEY_FIELDS:
        value = click[name]
        # isprintable() is a fast C check that passes almost every id; what it rejects
        # beyond ASCII control characters (e.g. a zero-width space) is allowed.
        if not value.isprintable() and (control := _CONTROL.search(value)):
            raise InvalidEvent(f"field {name!r} contains a control character ({control.group()!r})")
    click["user_agent"] = click.get("user_agent") or ""
    logged_in = event.get("logged_in", False)
    if logged_in is None:
        logged_in = False
    if not isinstance(logged_in, bool):
        raise InvalidEvent(f"field 'logged_in' must be a boolean, got {type(logged_in).__name__}")
    click["logged_in"] = logged_in
    context = event.get("context")
    if context is not None:
        if not isinstance(context, dict):
            raise InvalidEvent("field 'context' must be an object of strings")
        for key, value in context.items():
            if value is not None and (type(value) is not str or len(value) > MAX_FIELD_CHARS):
                _check_string(value, f"context.{key}")
        click["context"] = {k: v for k, v in context.items() if v is not None}
    return click


def parse_purchase(raw: bytes | str | dict | None) -> dict:
    """A validated purchase dict (``ts`` as epoch seconds, ``amount`` as float or 0)."""
    event = load_object(raw)
    purchase = dict(event)
    for name in PURCHASE_REQUIRED:
        if name not in event or event[name] is None:
            raise InvalidEvent(f"missing required field {name!r}")
    purchase["ts"] = parse_ts(event["ts"])
    for name in ("purchase_id", "user_id"):
        purchase[name] = _string(event, name, required=True)
    for name in ("customer_id", "click_id"):
        value = _string(event, name, required=False)
        purchase[name] = value
    amount = event.get("amount", 0.0)
    if amount is None:
        amount = 0.0
    if isinstance(amount, bool) or not isinstance(amount, int | float) or not math.isfinite(amount):
        raise InvalidEvent("field 'amount' must be a finite number")
    purchase["amount"] = float(amount)
    return purchase
