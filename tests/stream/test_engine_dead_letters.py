"""Dead letters always fit in a Kafka message, whatever was consumed (pure, no Kafka)."""

from __future__ import annotations

import base64
import hashlib

import orjson
import pytest

from events.schemas import InvalidEvent, parse_click
from stream.engine import (
    DEAD_LETTER_ORIGINAL_BYTES,
    MAX_DEAD_LETTER_BYTES,
    RawMessage,
    bounded_dead_letter,
    dead_letter,
)

HOSTILE = {
    "5 MB of control bytes": bytes(range(32)) * (5 * 1024 * 1024 // 32),
    "invalid UTF-8": b"\xff\xfe\x80" * 1_000_000,
    "huge JSON": orjson.dumps({"click_id": "c", "pad": ['\x01"\\' * 1000] * 2000}),
    "UTF-8 cut inside a character": "é".encode() * 100_000,
    "empty": b"",
}


def test_the_bound_is_far_under_a_kafka_message() -> None:
    assert MAX_DEAD_LETTER_BYTES < 256 * 1024 < 1_000_000


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_message_makes_a_bounded_dead_letter(name: str) -> None:
    raw = HOSTILE[name]
    try:  # the reason the engine would give, which may quote the input
        parse_click(raw)
        error = "accepted?"
    except InvalidEvent as exc:
        error = str(exc)
    letter = dead_letter(RawMessage(raw, "clicks", 5, 1234), error + "\x00" * 100_000)
    assert len(letter) <= MAX_DEAD_LETTER_BYTES
    record = orjson.loads(letter)
    assert record["original_bytes"] == len(raw)
    assert record["original_sha256"] == hashlib.sha256(raw).hexdigest()
    assert record["truncated"] is (len(raw) > DEAD_LETTER_ORIGINAL_BYTES)
    assert record["source"] == {"topic": "clicks", "partition": 5, "offset": 1234}
    assert record["error"].startswith(error[:100])
    if record["encoding"] == "utf-8":
        kept = record["original"].encode()
        raw.decode("utf-8")  # raises unless the whole original is UTF-8
    else:
        kept = base64.b64decode(record["original"])
    assert raw.startswith(kept)
    assert len(raw[:DEAD_LETTER_ORIGINAL_BYTES]) - len(kept) < 4  # at most a cut character


def test_a_small_message_is_kept_whole() -> None:
    raw = b'{"click_id": "c1", "ts": "soon"}'
    record = orjson.loads(dead_letter(RawMessage(raw, "clicks", 0, 7), "bad ts"))
    assert record["original"] == raw.decode() and record["encoding"] == "utf-8"
    assert record["truncated"] is False and record["error"] == "bad ts"
    binary = orjson.loads(dead_letter(RawMessage(b"\xff\x00", "clicks", 0, 8), "not JSON"))
    assert binary["encoding"] == "base64" and base64.b64decode(binary["original"]) == b"\xff\x00"


def test_a_lone_surrogate_in_the_error_does_not_break_the_dead_letter() -> None:
    letter = bounded_dead_letter(b"x", "bad \ud800 value", "decisions", None, None, b"k" * 10_000)
    record = orjson.loads(letter)
    assert record["source"]["partition"] is None and len(letter) <= MAX_DEAD_LETTER_BYTES
