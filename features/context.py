"""Hashed encoding of the categorical ad context (ad, advertiser, placement, context.*).

Each present ``field=value`` pair adds +1 or -1 to one of ``HASH_DIM`` slots (the
"hashing trick"): no vocabulary to ship with the model, unseen values still map
somewhere, and the MLP's first layer learns what the slots mean. CRC-32 is stable across
processes and Python versions, unlike ``hash()``.

``id_bucket`` is the other encoding of the same fields: one bucket index per field, for
the model's learned embeddings (the columns are declared in features/definitions.py).
"""

from __future__ import annotations

import functools
import zlib

HASH_DIM = 16
# Fields of the click schema hashed here; every key of ``context`` is added as context.<key>.
CONTEXT_FIELDS = ("ad_id", "advertiser_id", "placement", "query")


@functools.lru_cache(maxsize=65_536)  # ad ids and placements repeat: hash each once
def token_slot(field: str, value: str) -> tuple[int, float]:
    """Slot and sign of one ``field=value`` pair."""
    h = zlib.crc32(f"{field}={value}".encode())
    return h % HASH_DIM, (1.0 if (h >> 16) & 1 else -1.0)


@functools.lru_cache(maxsize=65_536)
def id_bucket(field: str, value: str, buckets: int) -> int:
    """Embedding bucket of one ``field=value`` pair, in [0, buckets): 0 for an absent or
    empty value, else ``1 + crc32("field=value") % (buckets - 1)``. No vocabulary: an
    unseen value lands in its bucket like any other."""
    if not value:
        return 0
    return 1 + zlib.crc32(f"{field}={value}".encode()) % (buckets - 1)


@functools.lru_cache(maxsize=65_536)
def context_slot(key: str, value: str) -> tuple[int, float]:
    """``token_slot`` of ``context.<key>=value``, without formatting the field per click."""
    return token_slot(f"context.{key}", value)


def context_vector(click: dict) -> list[float]:
    """The hashed encoding of one click: every present field's sign added to its slot.

    Empty values are skipped. Runs per click in the worker, on the click as
    ``features.limits.bounded_click`` leaves it (its strings become cache keys); the
    offline path hashes each distinct value once (features/batch.py) and must agree
    (tests/features/test_parity.py, tests/features/test_limits.py).
    """
    vec = [0.0] * HASH_DIM
    get = click.get
    for field in CONTEXT_FIELDS:
        value = get(field)
        if value:
            slot, sign = token_slot(field, value)
            vec[slot] += sign
    context = get("context")
    if context:
        for key, value in context.items():
            if value:
                slot, sign = context_slot(key, value)
                vec[slot] += sign
    return vec
