"""Vectorised features over a whole data set, equal to the per-event path.

The per-event path (``ClickFeaturizer``) folds clicks one by one into keyed state; here
the same counters come from sorting: clicks are grouped by (entity, bucket) with a
stable sort, so within each group they keep event-time order and "so far in the bucket"
becomes a running rank. Data must already be sorted by event time (``ClickColumns`` is).
tests/features/test_parity.py proves both paths agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa

from features.columns import ClickColumns
from features.context import CONTEXT_FIELDS, HASH_DIM, id_bucket, token_slot
from features.definitions import (
    COMBO_COLUMN,
    ID_COLUMN,
    ID_CONTEXT_KEYS,
    ID_FIELDS,
    INDEX,
    N_FEATURES,
    OTHER_CONTEXT_BUCKETS,
    OTHER_CONTEXT_IDS,
    QUERY_TOKENS,
    agent_features,
    agent_ids,
    query_ids,
    slice_of,
    time_features,
)
from features.limits import (
    MAX_CONTEXT_KEY_CHARS,
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_VALUE_CHARS,
    MAX_DISTINCT_MEMBERS,
    MAX_USER_AGENT_CHARS,
)
from features.useragent import resolve_device
from features.windows import COMBOS, COUNTS, DAY_S, DISTINCTS, GAP_CAP_S, ComboSpec, Window

# Column blocks of the feature vector, derived from its names: time and login, then the
# user-agent and device one-hots, then the hashed context.
_TIME_WIDTH = INDEX["ua_crawler"] - INDEX["hour_sin"]
_STATIC_WIDTH = INDEX["ctx_0"] - INDEX["hour_sin"]


def _dictionary(values: np.ndarray) -> tuple[list, np.ndarray]:
    """Distinct values (None kept) and each row's index into them, via Arrow (fast, C++)."""
    encoded = pa.array(values, type=pa.string()).dictionary_encode()
    uniques = encoded.dictionary.to_pylist()
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    if encoded.null_count:  # nulls get their own code after the distinct values
        indices = np.where(np.isnan(indices.astype(float)), len(uniques), indices)
        uniques.append(None)
    return uniques, indices.astype(np.int64)


def _codes(values: np.ndarray) -> np.ndarray:
    """Dense integer codes for an object array of strings."""
    return _dictionary(values)[1]


def _group_ids(entity: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    """One integer per (entity, bucket) pair, ordered by entity then bucket."""
    span = int(bucket.max() - bucket.min()) + 2 if len(bucket) else 1
    return entity * span + (bucket - bucket.min())


def running_count(groups: np.ndarray) -> np.ndarray:
    """1, 2, 3, ... within each group, in input order."""
    n = len(groups)
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.r_[True, g[1:] != g[:-1]] if n else np.zeros(0, bool)
    idx = np.arange(n)
    first = np.maximum.accumulate(np.where(starts, idx, 0))
    out = np.empty(n, dtype=np.int64)
    out[order] = idx - first + 1
    return out


def running_distinct(groups: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Distinct members seen so far within each group (including the current row)."""
    n = len(groups)
    _, group_rank = np.unique(groups, return_inverse=True)
    pair = group_rank.astype(np.int64) * (int(members.max()) + 1 if n else 1) + members
    order = np.argsort(pair, kind="stable")
    p = pair[order]
    new = np.empty(n, dtype=bool)
    new[order] = np.r_[True, p[1:] != p[:-1]] if n else np.zeros(0, bool)
    order_g = np.argsort(groups, kind="stable")
    g = groups[order_g]
    starts = np.r_[True, g[1:] != g[:-1]] if n else np.zeros(0, bool)
    csum = np.cumsum(new[order_g])
    base = np.maximum.accumulate(np.where(starts, csum - new[order_g], 0))
    out = np.empty(n, dtype=np.int64)
    out[order_g] = csum - base
    return out


def previous_bucket_total(entity: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    """Total clicks of the same entity in the previous bucket (0 when none)."""
    groups = _group_ids(entity, bucket)
    uniq, counts = np.unique(groups, return_counts=True)
    prev = groups - 1  # same entity: the span leaves a gap bucket between entities
    pos = np.searchsorted(uniq, prev)
    pos_clipped = np.minimum(pos, len(uniq) - 1)
    found = (pos < len(uniq)) & (uniq[pos_clipped] == prev)
    return np.where(found, counts[pos_clipped], 0)


def _buckets(ts: np.ndarray, window: Window) -> np.ndarray:
    return np.floor_divide(ts, window.seconds).astype(np.int64)


def gap_seconds(user: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Seconds since the user's previous click if it fell today or yesterday, else the cap."""
    n = len(ts)
    order = np.argsort(user, kind="stable")
    u = user[order]
    t = ts[order]
    same = np.r_[False, u[1:] == u[:-1]] if n else np.zeros(0, bool)
    prev_t = np.r_[0.0, t[:-1]] if n else np.zeros(0)
    day = np.floor_divide(t, DAY_S)
    prev_day = np.floor_divide(prev_t, DAY_S)
    # The per-event path keeps the latest time per day: for time-ordered input that is
    # the previous click, found only if it fell on this day or the one before.
    has_prev = same & (prev_day >= day - 1)
    gap = np.where(has_prev, np.minimum(np.maximum(t - prev_t, 0.0), GAP_CAP_S), GAP_CAP_S)
    out = np.empty(n)
    out[order] = gap
    return out


def _static_block(cols: ClickColumns, devices: np.ndarray) -> np.ndarray:
    """Time, login, user-agent and device features; agent parsing once per distinct pair."""
    n = len(cols)
    out = np.empty((n, _STATIC_WIDTH), dtype=np.float64)
    out[:, :_TIME_WIDTH] = time_features(cols.ts, cols.logged_in)
    agents, devs, inverse = _distinct_pairs(cols.user_agent, devices)
    table = np.array(
        [agent_features(a[:MAX_USER_AGENT_CHARS], d) for a, d in zip(agents, devs, strict=True)],
        dtype=np.float64,
    ).reshape(len(agents), _STATIC_WIDTH - _TIME_WIDTH)
    out[:, _TIME_WIDTH:] = table[inverse]
    return out


def _context_block(cols: ClickColumns) -> np.ndarray:
    """Hashed ad-context encoding, computed once per distinct value of each field."""
    n = len(cols)
    out = np.zeros((n, HASH_DIM), dtype=np.float64)
    fields = {name: cols.optional[name] for name in CONTEXT_FIELDS}
    fields.update({f"context.{k}": v for k, v in cols.context.items()})
    for field, values in fields.items():
        present = np.array([v is not None and v != "" for v in values], dtype=bool)
        if not present.any():
            continue
        uniq, inverse = _dictionary(values[present])
        slots = np.empty(len(uniq), dtype=np.int64)
        signs = np.empty(len(uniq))
        for j, value in enumerate(uniq):
            slots[j], signs[j] = token_slot(field, value[:MAX_CONTEXT_VALUE_CHARS])
        rows = np.nonzero(present)[0]
        np.add.at(out, (rows, slots[inverse]), signs[inverse])
    return out


class _FieldCodes:
    """String fields of a data set (``ClickColumns.strings``) as distinct values and each
    row's index into them, encoded once however many columns read the field."""

    def __init__(self, cols: ClickColumns) -> None:
        self.cols = cols
        self._done: dict[str, tuple[list, np.ndarray]] = {}

    def __call__(self, field: str) -> tuple[list, np.ndarray]:
        done = self._done.get(field)
        if done is None:
            done = self._done[field] = _dictionary(self.cols.strings(field))
        return done


def _per_distinct(
    codes: tuple[list, np.ndarray], encode: Callable[..., Sequence[int]], width: int
) -> np.ndarray:
    """``encode(value)`` (a tuple of ``width`` ints) of every row, computed once per
    distinct value (``codes``: a ``_FieldCodes`` answer): int64 [n, width]."""
    uniq, inverse = codes
    table = np.array([encode(v) for v in uniq], dtype=np.int64).reshape(len(uniq), width)
    return table[inverse]


def _id_block(cols: ClickColumns, fields: _FieldCodes) -> np.ndarray:
    """Embedding ids in ``EMBEDDINGS`` order, as ``id_features`` gives them per click.

    ``cols`` with its context as the features read it (``_read_context``); values are cut
    to ``MAX_CONTEXT_VALUE_CHARS`` here, once per distinct value."""
    n = len(cols)
    cut = MAX_CONTEXT_VALUE_CHARS

    def ids_of(field: str, buckets: int) -> Callable[[str], tuple[int]]:
        return lambda v: (id_bucket(field, v[:cut], buckets),)

    blocks = [_per_distinct(fields(field), ids_of(field, b), 1) for field, b in ID_FIELDS]
    blocks.append(_per_distinct(fields("query"), lambda v: query_ids(v[:cut]), QUERY_TOKENS))
    for key, b in ID_CONTEXT_KEYS:
        field = f"context.{key}"
        blocks.append(_per_distinct(fields(field), ids_of(field, b), 1))
    # Other context keys fill their columns in key order, each click its first ones.
    other = np.zeros((n, OTHER_CONTEXT_IDS), dtype=np.int64)
    filled = np.zeros(n, dtype=np.int64)
    configured = {key for key, _ in ID_CONTEXT_KEYS}
    for key in sorted(k for k in cols.context if k not in configured):
        field = f"context.{key}"
        ids = _per_distinct(fields(field), ids_of(field, OTHER_CONTEXT_BUCKETS), 1)[:, 0]
        rows = np.nonzero((ids > 0) & (filled < OTHER_CONTEXT_IDS))[0]
        other[rows, filled[rows]] = ids[rows]
        filled[rows] += 1
    blocks.append(other)
    blocks.append(
        _per_distinct(
            fields("user_agent"), lambda v: agent_ids(v[:MAX_USER_AGENT_CHARS]), len(agent_ids(""))
        )
    )
    return np.hstack(blocks) if n else np.zeros((0, N_FEATURES - ID_COLUMN), dtype=np.int64)


def _read_context(cols: ClickColumns) -> ClickColumns:
    """``cols`` with its context as the per-event path reads it (``features.limits``):
    keys over ``MAX_CONTEXT_KEY_CHARS`` left out, and in a click with more than
    ``MAX_CONTEXT_KEYS`` of the others only the first in key order. ``cols`` itself when
    no click is affected, which is the usual case."""
    context = {k: v for k, v in cols.context.items() if len(k) <= MAX_CONTEXT_KEY_CHARS}
    if len(context) == len(cols.context) and len(context) <= MAX_CONTEXT_KEYS:
        return cols
    if len(context) > MAX_CONTEXT_KEYS:
        read = np.zeros(len(cols), dtype=np.int64)  # keys each click had, in key order
        for key in sorted(context):
            values = context[key]
            present = values != None  # noqa: E711 - elementwise on an object array
            kept = values.copy()
            kept[~present | (read >= MAX_CONTEXT_KEYS)] = None
            context[key] = kept
            read += present
    return dataclasses.replace(cols, context=context)


def combo_codes(combo: ComboSpec, fields: _FieldCodes) -> np.ndarray:
    """One dense integer per distinct combination of the combo's field values (a missing
    field counts as "")."""
    code = fields(combo.fields[0])[1]
    for field in combo.fields[1:]:
        values = fields(field)[1]
        span = int(values.max()) + 1 if len(values) else 1
        if len(code) and int(code.max()) + 1 > 2**62 // span:  # renumber before it overflows
            code = _renumber(code)
        code = code * span + values
    # Dense again (below n), as _group_ids multiplies it by the buckets' span.
    return _renumber(code) if len(combo.fields) > 1 else code


def _renumber(code: np.ndarray) -> np.ndarray:
    return np.unique(code, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _combo_block(cols: ClickColumns, fields: _FieldCodes) -> np.ndarray:
    """Clicks per combination so far in each window's current bucket, in COMBOS order."""
    out = []
    for combo in COMBOS:
        entity = combo_codes(combo, fields)
        for window in combo.windows:
            out.append(running_count(_group_ids(entity, _buckets(cols.ts, window))))
    return np.stack(out, axis=1)


def _distinct_pairs(a: np.ndarray, b: np.ndarray) -> tuple[list, list, np.ndarray]:
    """Distinct (a, b) value pairs of two object arrays, and each row's pair index."""
    a_uniq, a_code = _dictionary(a)
    b_uniq, b_code = _dictionary(b)
    pairs, inverse = np.unique(a_code * len(b_uniq) + b_code, return_inverse=True)
    first_a = [a_uniq[i] for i in pairs // len(b_uniq)]
    first_b = [b_uniq[i] for i in pairs % len(b_uniq)]
    return first_a, first_b, inverse


def resolve_devices(cols: ClickColumns) -> np.ndarray:
    declared = cols.optional.get("device")
    if declared is None:
        declared = np.full(len(cols), None, dtype=object)
    agents, declared_values, inverse = _distinct_pairs(cols.user_agent, declared)
    resolved = [resolve_device(d, a) for a, d in zip(agents, declared_values, strict=True)]
    return np.array(resolved, dtype=object)[inverse]


def compute_features(cols: ClickColumns) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix (float32 [n, N_FEATURES]) and slice names of a time-sorted data set."""
    if len(cols) and np.any(np.diff(cols.ts) < 0):
        raise ValueError("clicks must be sorted by event time (ClickColumns keeps them sorted)")
    user = _codes(cols.user_id)
    ip = _codes(cols.ip)
    members = {"user": user, "ip": ip, "session": _codes(cols.session_id)}
    entity = {"user": user, "ip": ip}
    state: list[np.ndarray] = []
    for spec in COUNTS:
        b = _buckets(cols.ts, spec.window)
        state.append(running_count(_group_ids(entity[spec.entity], b)))
        if spec.previous:
            state.append(previous_bucket_total(entity[spec.entity], b))
    state.append(gap_seconds(user, cols.ts))
    for distinct in DISTINCTS:
        b = _buckets(cols.ts, distinct.window)
        groups = _group_ids(entity[distinct.entity], b)
        # A full set takes no new member online (features/limits.py): the same count.
        distinct_so_far = running_distinct(groups, members[distinct.member])
        state.append(np.minimum(distinct_so_far, MAX_DISTINCT_MEMBERS))
    devices = resolve_devices(cols)
    matrix = np.empty((len(cols), N_FEATURES), dtype=np.float32)
    k = len(state)
    matrix[:, :k] = np.log1p(np.stack(state, axis=1).astype(np.float64)) if len(cols) else 0
    matrix[:, k : k + _STATIC_WIDTH] = _static_block(cols, devices)
    # The encoders read the context as capped (features/limits.py); the combination
    # counters read it as it came, as the per-event path does.
    read = _read_context(cols)
    matrix[:, k + _STATIC_WIDTH : COMBO_COLUMN] = _context_block(read)
    fields = _FieldCodes(cols)
    if len(cols):
        matrix[:, COMBO_COLUMN:ID_COLUMN] = np.log1p(_combo_block(cols, fields).astype(np.float64))
    matrix[:, ID_COLUMN:] = _id_block(read, fields if read is cols else _FieldCodes(read))
    slices = np.array(
        [slice_of(d, li) for d, li in zip(devices, cols.logged_in, strict=True)], dtype=object
    )
    return matrix, slices
