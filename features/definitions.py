"""The feature vector of a click, and the incremental (per-event) way to compute it.

Feature groups (SLIDR's four, plus two):

1. user velocity: clicks per user over 10 s, 1 min, 1 h, 1 day, previous-bucket totals,
   and the gap since the user's previous click;
2. entity counters: distinct IPs and sessions per user, clicks, distinct users and
   sessions per IP;
3. time: hour of day and day of week on the unit circle (UTC, from the event time);
4. logged-in status;
5. user agent: declared crawler, missing agent, device, OS, browser family;
6. ad context: hashed encoding of ad, advertiser, placement, query and ``context.*``.

Counts enter the model as ``log1p(count)``. The vectorised offline path lives in
``features/batch.py`` and must give the same numbers (tests/features/test_parity.py).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from features.context import HASH_DIM, context_vector
from features.store import Row, RowPlan, StateStore
from features.useragent import (
    BROWSERS,
    DEVICES,
    OPERATING_SYSTEMS,
    parse_user_agent,
    resolve_device,
)
from features.windows import (
    COUNTS,
    DAY_S,
    DEFAULT_ALLOWED_LATENESS_S,
    DISTINCTS,
    GAP_CAP_S,
)

FEATURE_SPEC_VERSION = "f1"


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
    return tuple(names)


FEATURE_NAMES: tuple[str, ...] = _names()
N_FEATURES = len(FEATURE_NAMES)
INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}
_STATE_COLUMNS = FEATURE_NAMES.index("hour_sin")  # columns before it come from the stores
_AGENT_COLUMN = FEATURE_NAMES.index("ua_crawler")  # then time and login, then the agent
_CONTEXT_COLUMN = FEATURE_NAMES.index("ctx_0")  # and the hashed context last


def slice_of(device: str, logged_in: bool) -> str:
    """The traffic slice of a click, e.g. ``mobile/logged_in``."""
    return f"{device}/{'logged_in' if logged_in else 'logged_out'}"


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


# What each click asks of its user's state and of its IP's state (see RowPlan). Members
# of a user row are (ip, session); of an IP row (user, session).
_MEMBERS = {"user": ("ip", "session"), "ip": ("user", "session")}


def state_plan(entity: str, lateness_s: float) -> RowPlan:
    """The plan of one entity ("user" or "ip"): its COUNTS and DISTINCTS, and for users
    the time of the last click (for the gap)."""
    return RowPlan(
        counts=tuple(
            (s.window.seconds, f"c{s.window.name}:", s.previous) for s in COUNTS if s.entity == entity
        ),
        last_seen=entity == "user",
        distincts=tuple(
            (s.window.seconds, f"d{s.member}{s.window.name}:", _MEMBERS[entity].index(s.member))
            for s in DISTINCTS
            if s.entity == entity
        ),
        lateness_s=lateness_s,
    )


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
    for spec in DISTINCTS:
        distincts.append((spec.entity == "user", offsets[spec.entity][2][nth[spec.entity]]))
        nth[spec.entity] += 1
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
    worker); ``ip_store`` holds state keyed by IP (shared between workers via Redis).
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
        self.min_sweep_interval_s = min_sweep_interval_s
        self._swept_at = -math.inf  # monotonic clock
        self.watermark = -math.inf  # newest event time seen
        # Newest event time per source partition: state is only forgotten behind the
        # slowest partition, which may lag the others by hours of event time in a replay.
        self.partition_watermarks: dict[int, float] = {}
        self._expired_up_to = -math.inf

    def featurize(
        self, clicks: Sequence[dict], partitions: Sequence[int] | None = None
    ) -> ClickFeatures:
        """Fold a micro-batch of parsed clicks into state and return their features.

        With ``partitions`` (the Kafka partition of each click), user-keyed state is
        routed to that partition's store: ``user_store`` must then offer
        ``execute_routed_rows(plan, {partition: rows}, now) -> {partition: results}``.
        """
        user_rows: dict[int | None, list[Row]] = {}  # by partition, in click order
        ip_rows: list[Row] = []
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
            rows.append(("u:" + user_id, ts, (ip, session)))
            ip_rows.append(("i:" + ip, ts, (user_id, session)))
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
        ip_pending = self.ip_store.submit_rows(self.ip_plan, ip_rows, now)
        n = len(clicks)
        agents, contexts, slices = [], [], []
        times = np.empty(n, dtype=np.float64)
        logged = np.empty(n, dtype=np.float64)
        try:
            if partitions is None:
                rows = user_rows.get(None, [])
                user_res = {None: self.user_store.execute_rows(self.user_plan, rows, now)}
            else:
                user_res = self.user_store.execute_routed_rows(self.user_plan, user_rows, now)
            for row, click in enumerate(clicks):
                ua = click.get("user_agent") or ""
                device = resolve_device(click.get("device"), ua)
                logged_in = bool(click.get("logged_in"))
                times[row] = click["ts"]
                logged[row] = logged_in
                agents.append(agent_features(ua, device))
                contexts.append(context_vector(click))
                slices.append(slice_of(device, logged_in))
        finally:
            # Read even when the work above failed: an unread answer holds a connection.
            ip_res = ip_pending()
        state = [
            _state_counts(click["ts"], user_res[p], uo, ip_res, io)
            for click, (p, uo, io) in zip(clicks, where, strict=True)
        ]
        # Column blocks at once (numpy), in FEATURE_NAMES order.
        matrix = np.empty((n, N_FEATURES), dtype=np.float32)
        if n:
            matrix[:, :_STATE_COLUMNS] = np.log1p(np.array(state, dtype=np.float64))
            matrix[:, _STATE_COLUMNS:_AGENT_COLUMN] = time_features(times, logged)
            matrix[:, _AGENT_COLUMN:_CONTEXT_COLUMN] = agents
            matrix[:, _CONTEXT_COLUMN:] = contexts
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
