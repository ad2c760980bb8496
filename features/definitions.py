"""The feature vector of a click, and the incremental (per-event) way to compute it.

Feature groups (SLIDR's four, plus two):

1. user velocity: clicks per user over 10 s, 1 min, 1 h, 1 day, previous-bucket totals,
   and the gap since the user's previous click;
2. entity counters: distinct IPs and sessions per user, clicks, distinct users and
   sessions per IP; every distinct count saturates at ``MAX_DISTINCT_MEMBERS`` (64,
   ``features/limits.py``): the feature is ``min(distinct in the window, 64)``;
3. time: hour of day and day of week on the unit circle (UTC, from the event time);
4. logged-in status;
5. user agent: declared crawler, missing agent, device, OS, browser family;
6. ad context: hashed encoding of ad, advertiser, placement, query and ``context.*``;
7. combination counters: clicks per combination of fields (``COMBOS``: ip x app, ...);
8. embedding ids: one bucket index per ad-context field and user-agent family
   (``EMBEDDINGS``), for the model's learned embedding tables.

Columns, in this order: the user and IP counters (groups 1-2), time and login, the user
agent, the 16 hashed context slots, the combination counters, then the ids. Everything
before the ids is dense (``DENSE_COLUMNS``); each id column holds an exact integer in
[0, buckets) as a float. Counts enter the model as ``log1p(count)``. The vectorised
offline path lives in ``features/batch.py`` and must give the same numbers
(tests/features/test_parity.py).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import orjson

from features.columns import STRING_FIELDS
from features.context import HASH_DIM, context_vector, id_bucket
from features.limits import MAX_DISTINCT_MEMBER_CHARS as _MEMBER_CHARS
from features.limits import bounded_click, distinct_member
from features.store import PartitionedStore, Row, RowPlan, StateStore
from features.useragent import (
    BROWSERS,
    DEVICES,
    OPERATING_SYSTEMS,
    parse_user_agent,
    resolve_device,
)
from features.windows import (
    COMBOS,
    COUNTS,
    DAY_S,
    DEFAULT_ALLOWED_LATENESS_S,
    DISTINCTS,
    GAP_CAP_S,
    ComboSpec,
)

# f2: combination counters and embedding ids appended after the f1 columns.
# f3: bigger app, os, channel and device tables (same columns, other ids).
FEATURE_SPEC_VERSION = "f3"


@dataclass(frozen=True)
class EmbeddingColumn:
    """A feature column holding a bucket index for a learned embedding table.

    The value is an exact integer in [0, buckets), stored as a float: 0 when the field is
    absent or empty, else ``1 + crc32(f"{field}={value}") % (buckets - 1)`` (stable
    across processes, no vocabulary file; unseen values land in their bucket). Columns
    with the same ``table`` share one table (the query's tokens, the other context keys).
    """

    name: str
    table: str
    buckets: int


# Which fields get ids, and how many buckets each table has: a few thousand where a field
# has thousands of values (ads, devices, query words), fewer where it has tens or
# hundreds. Hashing folds the rest together; the model learns the mix.
ID_FIELDS: tuple[tuple[str, int], ...] = (
    ("ad_id", 4096),
    ("advertiser_id", 1024),
    ("placement", 256),
)
QUERY_TOKENS, QUERY_BUCKETS = 3, 4096  # first tokens, lower-cased, split on whitespace
# Context keys with a table each: the simulator's (publisher, channel) and TalkingData's
# (app, channel, os, device: numeric ids, ~700, ~200, ~800 and ~3,500 distinct values).
# About ten buckets a value: at 1,024 buckets 28% of the TalkingData sample's clicks had
# an app sharing its bucket with another app (channel 19%, os 23%); at 8,192 under 1%.
# On `make bench-real` (seeds 1, 2, 3, 7; width 16) the mean AUC went 0.950 -> 0.956 when
# channel joined app, os and device in the bigger tables.
ID_CONTEXT_KEYS: tuple[tuple[str, int], ...] = (
    ("publisher", 1024),
    ("channel", 8192),
    ("app", 8192),
    ("os", 8192),
    ("device", 16384),
)
# Any other context key: the first ones in key order, "context.<key>=value" hashed into
# one shared table.
OTHER_CONTEXT_IDS, OTHER_CONTEXT_BUCKETS = 2, 4096
# ua-parser's browser, OS and device families (features/useragent.py), by table.
ID_AGENT_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("ua_family", "browser_family", 512),
    ("ua_os", "os_family", 256),
    ("ua_device", "device_family", 2048),
)


def _embeddings() -> tuple[EmbeddingColumn, ...]:
    columns = [EmbeddingColumn(f"id_{field}", field, b) for field, b in ID_FIELDS]
    columns += [
        EmbeddingColumn(f"id_query_{i}", "query", QUERY_BUCKETS) for i in range(QUERY_TOKENS)
    ]
    columns += [EmbeddingColumn(f"id_context_{k}", f"context.{k}", b) for k, b in ID_CONTEXT_KEYS]
    columns += [
        EmbeddingColumn(f"id_context_other_{i}", "context_other", OTHER_CONTEXT_BUCKETS)
        for i in range(OTHER_CONTEXT_IDS)
    ]
    columns += [EmbeddingColumn(f"id_{table}", table, b) for table, _, b in ID_AGENT_FIELDS]
    return tuple(columns)


# The id columns, in FEATURE_NAMES order: they close the feature vector.
EMBEDDINGS: tuple[EmbeddingColumn, ...] = _embeddings()


def _names() -> tuple[str, ...]:
    names: list[str] = []
    for spec in COUNTS:
        names.append(spec.name)
        if spec.previous:
            names.append(spec.previous_name)
    names.append("u_gap_s")
    names.extend(spec.name for spec in DISTINCTS)
    names.extend(["hour_sin", "hour_cos", "dow_sin", "dow_cos", "logged_in"])
    names.extend(["ua_crawler", "ua_missing"])
    names.extend(f"device_{d}" for d in DEVICES)
    names.extend(f"os_{o}" for o in OPERATING_SYSTEMS)
    names.extend(f"browser_{b}" for b in BROWSERS)
    names.extend(f"ctx_{i}" for i in range(HASH_DIM))
    for combo in COMBOS:
        unknown = [
            f for f in combo.fields if not f.startswith("context.") and f not in STRING_FIELDS
        ]
        if unknown:
            raise ValueError(
                f"combination {combo.name}: {unknown} are not string fields of a click"
            )
        names.extend(combo.names)
    names.extend(column.name for column in EMBEDDINGS)
    return tuple(names)


FEATURE_NAMES: tuple[str, ...] = _names()
N_FEATURES = len(FEATURE_NAMES)
INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
_STATE_COLUMNS = FEATURE_NAMES.index("hour_sin")  # columns before it come from the stores
_AGENT_COLUMN = FEATURE_NAMES.index("ua_crawler")  # then time and login, then the agent
_CONTEXT_COLUMN = FEATURE_NAMES.index("ctx_0")  # then the hashed context
COMBO_COLUMN = _CONTEXT_COLUMN + HASH_DIM  # then the combination counters (shared state)
ID_COLUMN = N_FEATURES - len(EMBEDDINGS)  # and the embedding ids last
# Indices of the columns that are not ids (the model's dense input).
DENSE_COLUMNS: tuple[int, ...] = tuple(range(ID_COLUMN))


def slice_of(device: str, logged_in: bool) -> str:
    """The traffic slice of a click, e.g. ``mobile/logged_in``."""
    return f"{device}/{'logged_in' if logged_in else 'logged_out'}"


def signed_in_counterpart(slice_name: str) -> str | None:
    """The signed-in slice of a signed-out slice's device (``mobile/logged_out`` ->
    ``mobile/logged_in``); None for any other name, and for a signed-out slice without a
    device name."""
    device, _, status = slice_name.rpartition("/")
    return slice_of(device, True) if device and status == "logged_out" else None


def time_features(ts: np.ndarray, logged_in: np.ndarray) -> np.ndarray:
    """Hour of day and day of week on the unit circle (UTC), and logged-in status
    (booleans or 0/1).

    Vectorised (float64 [n, 5]); both the worker and the offline path call it.
    """
    hour = np.mod(ts, DAY_S) / 3600.0
    dow = np.mod(np.floor_divide(ts, DAY_S) + 3, 7)  # 1970-01-01 was a Thursday; Monday is 0
    out = np.empty((len(ts), 5), dtype=np.float64)
    out[:, 0] = np.sin(2 * math.pi * hour / 24)
    out[:, 1] = np.cos(2 * math.pi * hour / 24)
    out[:, 2] = np.sin(2 * math.pi * dow / 7)
    out[:, 3] = np.cos(2 * math.pi * dow / 7)
    out[:, 4] = logged_in
    return out


@functools.lru_cache(maxsize=65_536)  # a few thousand (agent, device) pairs repeat
def agent_features(user_agent: str, device: str) -> tuple[float, ...]:
    """Declared crawler, missing agent, device, OS and browser one-hots."""
    ua = parse_user_agent(user_agent)
    row = [1.0 if ua.is_crawler else 0.0, 1.0 if ua.missing else 0.0]
    row.extend(1.0 if device == d else 0.0 for d in DEVICES)
    row.extend(1.0 if ua.os == o else 0.0 for o in OPERATING_SYSTEMS)
    row.extend(1.0 if ua.browser == b else 0.0 for b in BROWSERS)
    return tuple(row)


_ID_FIELD_NAMES = tuple(field for field, _ in ID_FIELDS)
_ID_CONTEXT_KEYS = frozenset(key for key, _ in ID_CONTEXT_KEYS)
_NO_CONTEXT_IDS = (0,) * (len(ID_CONTEXT_KEYS) + OTHER_CONTEXT_IDS)
_NO_CONTEXT: dict[str, str] = {}


@functools.lru_cache(maxsize=65_536)
def ad_ids(values: tuple[str | None, ...]) -> tuple[int, ...]:
    """Ids of the ``ID_FIELDS`` values (None where absent): an ad comes with its
    advertiser and a few placements, so the tuple repeats as much as the ad does."""
    return tuple(id_bucket(f, v, b) for (f, b), v in zip(ID_FIELDS, values, strict=True))


@functools.lru_cache(maxsize=65_536)
def query_ids(query: str | None) -> tuple[int, ...]:
    """Ids of the first ``QUERY_TOKENS`` tokens of a query (lower-cased, split on
    whitespace); 0 for tokens it does not have."""
    tokens = query.lower().split()[:QUERY_TOKENS] if query else []
    ids = [id_bucket("query", token, QUERY_BUCKETS) for token in tokens]
    return (*ids, *(0,) * (QUERY_TOKENS - len(ids)))


# A context of up to 16 keys is ~6 KB as a cache key (features/limits.py): fewer entries.
@functools.lru_cache(maxsize=16_384)
def context_ids(items: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
    """Ids of a click's context (``items``: its key, value pairs): one per
    ``ID_CONTEXT_KEYS`` key, then up to ``OTHER_CONTEXT_IDS`` other keys with a value,
    in key order."""
    context = dict(items)
    ids = [id_bucket(f"context.{key}", context.get(key), b) for key, b in ID_CONTEXT_KEYS]
    others = sorted(k for k, v in items if v and k not in _ID_CONTEXT_KEYS)[:OTHER_CONTEXT_IDS]
    ids.extend(id_bucket(f"context.{k}", context[k], OTHER_CONTEXT_BUCKETS) for k in others)
    ids.extend((0,) * (OTHER_CONTEXT_IDS - len(others)))
    return tuple(ids)


@functools.lru_cache(maxsize=65_536)
def agent_ids(user_agent: str) -> tuple[int, ...]:
    """Ids of the user agent's ua-parser families (``ID_AGENT_FIELDS``); 0 where the
    parser recognised none, or the click had no agent."""
    ua = parse_user_agent(user_agent)
    return tuple(id_bucket(table, getattr(ua, attr), b) for table, attr, b in ID_AGENT_FIELDS)


def id_features(click: dict) -> tuple[int, ...]:
    """The embedding ids of one click, in ``EMBEDDINGS`` order. Each part is cached (by
    value, query, whole context and agent: they repeat), not the click's whole tuple, so
    the click is one as ``features.limits.bounded_click`` leaves it."""
    get = click.get
    context = get("context")
    return (
        *ad_ids(tuple(map(get, _ID_FIELD_NAMES))),
        *query_ids(get("query")),
        *(context_ids(tuple(context.items())) if context else _NO_CONTEXT_IDS),
        *agent_ids(get("user_agent") or ""),
    )


# What each click asks of its user's state and of its IP's state (see RowPlan). Members
# of a user row are (ip, session); of an IP row (user, session).
_MEMBERS = {"user": ("ip", "session"), "ip": ("user", "session")}


def state_plan(entity: str, lateness_s: float) -> RowPlan:
    """The plan of one entity ("user" or "ip"): its COUNTS and DISTINCTS, and for users
    the time of the last click (for the gap)."""
    return RowPlan(
        counts=tuple(
            (s.window.seconds, f"c{s.window.name}:", s.previous)
            for s in COUNTS
            if s.entity == entity
        ),
        last_seen=entity == "user",
        distincts=tuple(
            (s.window.seconds, f"d{s.member}{s.window.name}:", _MEMBERS[entity].index(s.member))
            for s in DISTINCTS
            if s.entity == entity
        ),
        lateness_s=lateness_s,
    )


def combo_plan(combo: ComboSpec, lateness_s: float) -> RowPlan:
    """The plan of one combination: a count per window (its entity names the values)."""
    return RowPlan(
        counts=tuple((w.seconds, f"c{w.name}:", False) for w in combo.windows),
        last_seen=False,
        distincts=(),
        lateness_s=lateness_s,
    )


# Values longer than this enter combination entities as a digest (see combo_entity).
_LONG_VALUE = 32


# Combinations read values as they came (up to 4096 characters): only digests of values
# up to this long are cached, so the cache holds at most 65,536 of them.
_CACHED_LONG_VALUE_CHARS = 512


def _long_value(value: str) -> tuple[str]:
    """A long value's stand-in in entity names: a one-element list (in JSON) holding its
    128-bit BLAKE2b digest, which no string value can be equal to."""
    if len(value) > _CACHED_LONG_VALUE_CHARS:
        return _digest(value)
    return _cached_digest(value)


@functools.lru_cache(maxsize=65_536)  # user agents, mostly: a few thousand repeat
def _cached_digest(value: str) -> tuple[str]:
    return _digest(value)


def _digest(value: str) -> tuple[str]:
    return (hashlib.blake2b(value.encode(), digest_size=16).hexdigest(),)


def combo_entity(combo: ComboSpec, values: Sequence[str]) -> str:
    """The state entity of one combination of values (a missing field's value is ""):
    ``c:<name>:`` and the values as a JSON array, which tells every tuple of strings
    apart and holds no control character (the shared store's row format separates
    fields with them). Values over 32 characters (user agents) enter as a digest: long
    keys cost Valkey more than the extra command does (13.6 against 17.8 ms a
    500-click call with the default combinations)."""
    short = [v if len(v) <= _LONG_VALUE else _long_value(v) for v in values]
    return f"c:{combo.name}:" + orjson.dumps(short).decode()


def combo_entities_function(combos: Sequence[ComboSpec]) -> Callable[[dict], tuple[str, ...]]:
    """A function giving one click's ``combo_entity`` of every combination, in order.

    It runs for every click, so its source is written here from the declarations, with
    no loop left: each field is read once and each combination's values packed straight
    into its JSON (0.7 us a click for the default three, against 1.7 us looping over the
    specs). tests/features/test_parity.py checks it against ``combo_entity``.
    """
    fields = list(dict.fromkeys(f for c in combos for f in c.fields))
    lines = [
        "def entities(click):",
        "    get = click.get",
        "    cget = (get('context') or EMPTY).get",
    ]
    for i, field in enumerate(fields):
        if field.startswith("context."):
            lines.append(f"    v{i} = cget({field[len('context.') :]!r}) or ''")
        else:
            lines.append(f"    v{i} = get({field!r}) or ''")
        lines.append(f"    if len(v{i}) > {_LONG_VALUE}: v{i} = long_value(v{i})")
    packed = []
    for c in combos:
        prefix = "c:" + c.name + ":"
        values = "".join(f"v{fields.index(f)}, " for f in c.fields)
        packed.append(f"{prefix!r} + dumps(({values})).decode()")
    lines.append(f"    return ({''.join(p + ', ' for p in packed)})")
    namespace: dict[str, Any] = {
        "EMPTY": _NO_CONTEXT,
        "dumps": orjson.dumps,
        "long_value": _long_value,
    }
    exec("\n".join(lines), namespace)  # noqa: S102 - source built above from the declarations
    return namespace["entities"]


def _result_positions() -> tuple[tuple[tuple[bool, int], ...], int, tuple[tuple[bool, int], ...]]:
    """Where each state column's value sits among one click's results, from the plans'
    own layout (``RowPlan.offsets``): (count columns as (from the user row?, position)),
    position of the user's "last click today" (yesterday's follows it), (distinct
    columns likewise). The plans list each entity's specs in COUNTS/DISTINCTS order."""
    offsets = {entity: state_plan(entity, 0.0).offsets() for entity in ("user", "ip")}
    counts: list[tuple[bool, int]] = []
    nth = {"user": 0, "ip": 0}
    for spec in COUNTS:
        at = offsets[spec.entity][0][nth[spec.entity]]
        nth[spec.entity] += 1
        counts.append((spec.entity == "user", at))
        if spec.previous:
            counts.append((spec.entity == "user", at + 1))
    nth = {"user": 0, "ip": 0}
    distincts = []
    for distinct in DISTINCTS:
        at = offsets[distinct.entity][2][nth[distinct.entity]]
        distincts.append((distinct.entity == "user", at))
        nth[distinct.entity] += 1
    return tuple(counts), offsets["user"][1], tuple(distincts)


_COUNT_AT, _LAST_AT, _DISTINCT_AT = _result_positions()


def _state_counts(ts: float, user_res: list, uo: int, ip_res: list, io: int) -> list[float]:
    """A click's state columns before ``log1p`` (counts, and the gap in seconds) from its
    rows' results, which start at ``uo`` in ``user_res`` and ``io`` in ``ip_res``."""
    # A missing previous bucket counts 0; current-bucket counts are at least 1.
    values = [(user_res[uo + j] if u else ip_res[io + j]) or 0 for u, j in _COUNT_AT]
    previous = user_res[uo + _LAST_AT]
    if previous is None:
        previous = user_res[uo + _LAST_AT + 1]
    values.append(GAP_CAP_S if previous is None else min(max(ts - previous, 0.0), GAP_CAP_S))
    values.extend(user_res[uo + j] if u else ip_res[io + j] for u, j in _DISTINCT_AT)
    return values


@dataclass
class ClickFeatures:
    """Features of a micro-batch: one row per click, in the order given."""

    matrix: np.ndarray  # float32 [n, N_FEATURES]
    slices: list[str]
    late: list[bool]  # older than the watermark minus the allowed lateness


class ClickFeaturizer:
    """Incremental features: updates state with each click and reads the click's vector.

    ``user_store`` holds state keyed by user (local to the Kafka partition in the
    worker); ``ip_store`` holds the state shared between workers (Redis): that of IPs
    and of the ``COMBOS`` combinations, asked for in one ``submit_plans`` call per batch.
    Clicks are folded in the order given; late clicks (event time older than the newest
    seen minus ``allowed_lateness_s``) are still scored and flagged in ``ClickFeatures.late``.
    """

    def __init__(
        self,
        user_store: StateStore,
        ip_store: StateStore,
        allowed_lateness_s: float = DEFAULT_ALLOWED_LATENESS_S,
        min_sweep_interval_s: float = 0.0,
    ) -> None:
        self.user_store = user_store
        self.ip_store = ip_store
        self.lateness = allowed_lateness_s
        self.user_plan = state_plan("user", allowed_lateness_s)
        self.ip_plan = state_plan("ip", allowed_lateness_s)
        self.combo_plans = tuple(combo_plan(c, allowed_lateness_s) for c in COMBOS)
        self._combo_entities = combo_entities_function(COMBOS)
        self.min_sweep_interval_s = min_sweep_interval_s
        self._swept_at = -math.inf  # monotonic clock
        self.watermark = -math.inf  # newest event time seen
        # Newest event time per source partition: state is only forgotten behind the
        # slowest partition, which may lag the others by hours of event time in a replay.
        self.partition_watermarks: dict[int, float] = {}
        self._expired_up_to = -math.inf

    def forget_partitions(self, partitions: Sequence[int]) -> None:
        """Drop the watermarks of partitions no longer folded here (revoked in a
        rebalance). Expiry waits for the slowest partition; one that will never move
        again would hold every other partition's state for good. A partition assigned
        again starts afresh: its first clicks set its watermark."""
        for partition in partitions:
            self.partition_watermarks.pop(partition, None)

    def featurize(
        self, clicks: Sequence[dict], partitions: Sequence[int] | None = None
    ) -> ClickFeatures:
        """Fold a micro-batch of parsed clicks into state and return their features.

        With ``partitions`` (the Kafka partition of each click), user-keyed state is
        routed to that partition's store: ``user_store`` must then be a
        ``PartitionedStore`` (``execute_routed_rows(plan, {partition: rows}, now)``).
        """
        # By partition (under None without partitions), in click order.
        user_rows: dict[Any, list[Row]] = {}
        ip_rows: list[Row] = []
        combo_entities = self._combo_entities
        entities: list[tuple[str, ...]] = []  # per click: its combinations' entities
        user_width, ip_width = self.user_plan.width, self.ip_plan.width
        where = []  # per click: (partition, offset of its user results, of its ip results)
        late_flags = []
        marks = self.partition_watermarks
        for k, click in enumerate(clicks):
            p = partitions[k] if partitions is not None else None
            rows = user_rows.get(p)
            if rows is None:
                rows = user_rows[p] = []
            where.append((p, len(rows) * user_width, k * ip_width))
            ts = click["ts"]
            user_id, ip = click["user_id"], click["ip"]
            session = click.get("session_id") or user_id
            # Distinct-set members: long ids as digests, so a set stays a few KB.
            if len(user_id) > _MEMBER_CHARS or len(ip) > _MEMBER_CHARS:
                user_member, ip_member = distinct_member(user_id), distinct_member(ip)
            else:
                user_member, ip_member = user_id, ip
            if len(session) > _MEMBER_CHARS:
                session = distinct_member(session)
            rows.append(("u:" + user_id, ts, (ip_member, session)))
            ip_rows.append(("i:" + ip, ts, (user_member, session)))
            entities.append(combo_entities(click))
            # Late within its own partition: partitions may be consumed at different
            # event times without any click being late.
            seen = marks.get(p, -math.inf) if p is not None else self.watermark
            late_flags.append(ts < seen - self.lateness)
            if ts > self.watermark:
                self.watermark = ts
            if p is not None and ts > seen:
                marks[p] = ts
        now = self.watermark
        # The shared store (Redis) answers while the user state and the stateless
        # columns are computed here.
        jobs = [(self.ip_plan, ip_rows)]
        for c, plan in enumerate(self.combo_plans):
            jobs.append(
                (plan, [(e[c], row[1], ()) for e, row in zip(entities, ip_rows, strict=True)])
            )
        shared_pending = self.ip_store.submit_plans(jobs, now)
        n = len(clicks)
        agents, contexts, ids, slices = [], [], [], []
        times = np.empty(n, dtype=np.float64)
        logged = np.empty(n, dtype=np.float64)
        try:
            if partitions is None:
                rows = user_rows.get(None, [])
                user_res: dict[Any, list[Any]] = {
                    None: self.user_store.execute_rows(self.user_plan, rows, now)
                }
            else:
                routed = cast(PartitionedStore, self.user_store)  # the docstring's contract
                user_res = routed.execute_routed_rows(self.user_plan, user_rows, now)
            for row, raw_click in enumerate(clicks):
                # Strings cut to the caps before any parse or cache (features/limits.py).
                click = bounded_click(raw_click)
                ua = click.get("user_agent") or ""
                device = resolve_device(click.get("device"), ua)
                logged_in = bool(click.get("logged_in"))
                times[row] = click["ts"]
                logged[row] = logged_in
                agents.append(agent_features(ua, device))
                contexts.append(context_vector(click))
                ids.append(id_features(click))
                slices.append(slice_of(device, logged_in))
            # The columns that need no shared state, while its answer may still be coming.
            matrix = np.empty((n, N_FEATURES), dtype=np.float32)
            if n:
                matrix[:, _STATE_COLUMNS:_AGENT_COLUMN] = time_features(times, logged)
                matrix[:, _AGENT_COLUMN:_CONTEXT_COLUMN] = agents
                matrix[:, _CONTEXT_COLUMN:COMBO_COLUMN] = contexts
                matrix[:, ID_COLUMN:] = np.fromiter(  # a third of the time of assigning tuples
                    itertools.chain.from_iterable(ids), dtype=np.float32, count=n * len(EMBEDDINGS)
                ).reshape(n, len(EMBEDDINGS))
        finally:
            # Read even when the work above failed: an unread answer holds a connection.
            ip_res, *combo_res = shared_pending()
        if n:
            state = [
                _state_counts(click["ts"], user_res[p], uo, ip_res, io)
                for click, (p, uo, io) in zip(clicks, where, strict=True)
            ]
            matrix[:, :_STATE_COLUMNS] = np.log1p(np.array(state, dtype=np.float64))
            at = COMBO_COLUMN
            for plan, res in zip(self.combo_plans, combo_res, strict=True):
                counts = np.array(res, dtype=np.float64).reshape(n, plan.width)
                matrix[:, at : at + plan.width] = np.log1p(counts)
                at += plan.width
        self._maybe_expire()
        return ClickFeatures(matrix, slices, late_flags)

    def _maybe_expire(self) -> None:
        # Sweep once per hour of event time: bounds memory to ~two days of keys. A backlog
        # runs through event hours in seconds, and a sweep reads every stored entity, so
        # the worker also waits ``min_sweep_interval_s`` of wall time between sweeps.
        # Features of on-time clicks do not depend on when sweeps run: they never read an
        # expired field.
        slowest = min(self.partition_watermarks.values(), default=self.watermark)
        horizon = slowest - self.lateness  # never ahead of the global watermark
        self.user_store.set_horizon(horizon)  # cheap: records shed stale fields on load
        if horizon - self._expired_up_to < 3600:
            return
        if time.monotonic() - self._swept_at < self.min_sweep_interval_s:
            return
        self.user_store.expire(horizon)
        self.ip_store.expire(horizon)
        self._expired_up_to = horizon
        self._swept_at = time.monotonic()


assert len(_COUNT_AT) + 1 + len(_DISTINCT_AT) == _STATE_COLUMNS
assert COMBO_COLUMN + sum(len(c.windows) for c in COMBOS) == ID_COLUMN
