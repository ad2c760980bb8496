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
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from features.context import HASH_DIM, click_tokens, token_slot
from features.store import GET, INCR, MAX, SADD, Op, StateStore
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


def slice_of(device: str, logged_in: bool) -> str:
    """The traffic slice of a click, e.g. ``mobile/logged_in``."""
    return f"{device}/{'logged_in' if logged_in else 'logged_out'}"


def time_features(ts: float, logged_in: bool) -> list[float]:
    """Hour of day and day of week on the unit circle (UTC), and logged-in status."""
    hour = (ts % DAY_S) / 3600.0
    dow = (ts // DAY_S + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
    return [
        math.sin(2 * math.pi * hour / 24),
        math.cos(2 * math.pi * hour / 24),
        math.sin(2 * math.pi * dow / 7),
        math.cos(2 * math.pi * dow / 7),
        1.0 if logged_in else 0.0,
    ]


@functools.lru_cache(maxsize=65_536)  # a few thousand (agent, device) pairs repeat
def agent_features(user_agent: str, device: str) -> tuple[float, ...]:
    """Declared crawler, missing agent, device, OS and browser one-hots."""
    ua = parse_user_agent(user_agent)
    row = [1.0 if ua.is_crawler else 0.0, 1.0 if ua.missing else 0.0]
    row.extend(1.0 if device == d else 0.0 for d in DEVICES)
    row.extend(1.0 if ua.os == o else 0.0 for o in OPERATING_SYSTEMS)
    row.extend(1.0 if ua.browser == b else 0.0 for b in BROWSERS)
    return tuple(row)


def context_features(click: dict) -> list[float]:
    vec = [0.0] * HASH_DIM
    for field, value in click_tokens(click):
        slot, sign = token_slot(field, value)
        vec[slot] += sign
    return vec


# The window specs flattened for the per-event hot path; field names and expiry follow
# Window.bucket / Window.expire_at (the batch path uses those directly).
_COUNT_PLAN = tuple(
    (s.entity == "user", s.window.seconds, f"c{s.window.name}:", s.previous) for s in COUNTS
)
_DISTINCT_PLAN = tuple(
    (s.entity == "user", s.window.seconds, f"d{s.member}{s.window.name}:", s.member) for s in DISTINCTS
)


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
    ) -> None:
        self.user_store = user_store
        self.ip_store = ip_store
        self.lateness = allowed_lateness_s
        self.watermark = -math.inf  # newest event time seen
        # Newest event time per source partition: state is only forgotten behind the
        # slowest partition, which may lag the others by hours of event time in a replay.
        self.partition_watermarks: dict[int, float] = {}
        self._expired_up_to = -math.inf

    def ops_for(self, click: dict) -> tuple[list[Op], list[Op]]:
        """State operations of one click: (user-keyed ops, ip-keyed ops).

        Runs for every click in the worker: the window specs are flattened into plans
        once (``_COUNT_PLAN``, ``_DISTINCT_PLAN``), so this loop does arithmetic and
        string joins only.
        """
        ts = click["ts"]
        late = self.lateness
        user_id = click["user_id"]
        user = "u:" + user_id
        ip = "i:" + click["ip"]
        members = {"user": user_id, "ip": click["ip"], "session": click.get("session_id") or user_id}
        user_ops: list[Op] = []
        ip_ops: list[Op] = []
        for is_user, seconds, prefix, previous in _COUNT_PLAN:
            b = int(ts // seconds)
            ent, out = (user, user_ops) if is_user else (ip, ip_ops)
            out.append((INCR, ent, prefix + str(b), None, (b + 2) * seconds + late))
            if previous:
                out.append((GET, ent, prefix + str(b - 1), None, 0.0))
        day = int(ts // DAY_S)
        user_ops.append((MAX, user, f"last:{day}", ts, (day + 2) * DAY_S + late))
        user_ops.append((GET, user, f"last:{day - 1}", None, 0.0))
        for is_user, seconds, prefix, member in _DISTINCT_PLAN:
            b = int(ts // seconds)
            ent, out = (user, user_ops) if is_user else (ip, ip_ops)
            out.append((SADD, ent, prefix + str(b), members[member], (b + 2) * seconds + late))
        return user_ops, ip_ops

    def state_features(self, click: dict, user_res: list, ip_res: list) -> list[float]:
        """Turn one click's op results (same order as ``ops_for``) into state features."""
        ui = ii = 0
        counts: list[float] = []
        for spec in COUNTS:
            res = user_res if spec.entity == "user" else ip_res
            j = ui if spec.entity == "user" else ii
            counts.append(res[j])
            j += 1
            if spec.previous:
                counts.append(res[j] or 0)
                j += 1
            if spec.entity == "user":
                ui = j
            else:
                ii = j
        last_today, last_yesterday = user_res[ui], user_res[ui + 1]
        ui += 2
        previous = last_today if last_today is not None else last_yesterday
        gap = GAP_CAP_S if previous is None else min(max(click["ts"] - previous, 0.0), GAP_CAP_S)
        counts.append(gap)
        for spec in DISTINCTS:
            if spec.entity == "user":
                counts.append(user_res[ui])
                ui += 1
            else:
                counts.append(ip_res[ii])
                ii += 1
        return [math.log1p(c) for c in counts]

    def featurize(
        self, clicks: Sequence[dict], partitions: Sequence[int] | None = None
    ) -> ClickFeatures:
        """Fold a micro-batch of parsed clicks into state and return their features.

        With ``partitions`` (the Kafka partition of each click), user-keyed state is
        routed to that partition's store: ``user_store`` must then offer
        ``execute_routed(ops, routes, now)``.
        """
        user_ops: list[Op] = []
        routes: list[int] = []
        ip_ops: list[Op] = []
        spans = []
        late_flags = []
        for click in clicks:
            u, i = self.ops_for(click)
            spans.append((len(user_ops), len(u), len(ip_ops), len(i)))
            if partitions is not None:
                routes.extend([partitions[len(spans) - 1]] * len(u))
            user_ops.extend(u)
            ip_ops.extend(i)
            ts = click["ts"]
            # Late within its own partition: partitions may be consumed at different
            # event times without any click being late.
            p = partitions[len(spans) - 1] if partitions is not None else None
            seen = self.partition_watermarks.get(p, -math.inf) if p is not None else self.watermark
            late_flags.append(ts < seen - self.lateness)
            if ts > self.watermark:
                self.watermark = ts
            if p is not None and ts > seen:
                self.partition_watermarks[p] = ts
        now = self.watermark
        if partitions is None:
            user_res = self.user_store.execute(user_ops, now)
        else:
            user_res = self.user_store.execute_routed(user_ops, routes, now)
        ip_res = self.ip_store.execute(ip_ops, now)
        matrix = np.empty((len(clicks), N_FEATURES), dtype=np.float32)
        slices = []
        for row, (click, (uo, un, io, inn)) in enumerate(zip(clicks, spans, strict=True)):
            ua = click.get("user_agent") or ""
            device = resolve_device(click.get("device"), ua)
            logged_in = bool(click.get("logged_in"))
            values = self.state_features(click, user_res[uo : uo + un], ip_res[io : io + inn])
            values.extend(time_features(click["ts"], logged_in))
            values.extend(agent_features(ua, device))
            values.extend(context_features(click))
            matrix[row] = values
            slices.append(slice_of(device, logged_in))
        self._maybe_expire()
        return ClickFeatures(matrix, slices, late_flags)

    def _maybe_expire(self) -> None:
        # Sweep once per hour of event time: cheap, and bounds memory to ~two days of keys.
        slowest = min(self.partition_watermarks.values(), default=self.watermark)
        horizon = slowest - self.lateness  # never ahead of the global watermark
        if horizon - self._expired_up_to >= 3600:
            self.user_store.expire(horizon)
            self.ip_store.expire(horizon)
            self._expired_up_to = horizon


assert sum(1 + s.previous for s in COUNTS) + 1 + len(DISTINCTS) == _STATE_COLUMNS
