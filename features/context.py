"""Hashed encoding of the categorical ad context (ad, advertiser, placement, context.*).

Each present ``field=value`` pair adds +1 or -1 to one of ``HASH_DIM`` slots (the
"hashing trick"): no vocabulary to ship with the model, unseen values still map
somewhere, and the MLP's first layer learns what the slots mean. CRC-32 is stable across
processes and Python versions, unlike ``hash()``.
"""

from __future__ import annotations

import functools
import zlib

HASH_DIM = 16
# Fields of the click schema hashed here; every key of ``context`` is added as context.<key>.
CONTEXT_FIELDS = ("ad_id", "advertiser_id", "placement", "query")


@functools.lru_cache(maxsize=262_144)  # ad ids and placements repeat: hash each once
def token_slot(field: str, value: str) -> tuple[int, float]:
    """Slot and sign of one ``field=value`` pair."""
    h = zlib.crc32(f"{field}={value}".encode())
    return h % HASH_DIM, (1.0 if (h >> 16) & 1 else -1.0)


def click_tokens(click: dict) -> list[tuple[str, str]]:
    """The (field, value) pairs of a click that the encoding hashes; empty values skipped."""
    tokens = [(f, click[f]) for f in CONTEXT_FIELDS if click.get(f)]
    context = click.get("context") or {}
    tokens.extend((f"context.{k}", v) for k, v in context.items() if v)
    return tokens
