"""Event-time windows: tumbling buckets, and the counters defined over them.

Every window is a tumbling bucket of ``seconds`` aligned to the epoch, measured on the
click's own timestamp (never the wall clock), so a replay of last week's traffic sees
exactly the counts the live stream saw. A counter reads "so far in the current bucket"
(including the click itself); some also read the previous bucket's total, which smooths
the reset at a bucket boundary. Counters are kept per user, per IP (``COUNTS``,
``DISTINCTS``) and per combination of click fields (``COMBOS``).
"""

from __future__ import annotations

from dataclasses import dataclass

DAY_S = 86_400
# Events may arrive this much after the newest event seen and still find their state.
DEFAULT_ALLOWED_LATENESS_S = 300.0


@dataclass(frozen=True)
class Window:
    """A tumbling event-time window, ``seconds`` long, named like ``1m``."""

    name: str
    seconds: int

    def bucket(self, ts: float) -> int:
        """Index of the bucket holding event time ``ts`` (epoch seconds)."""
        return int(ts // self.seconds)

    def expire_at(self, bucket: int, lateness_s: float) -> float:
        """Event time after which the bucket's state is no longer read.

        The next bucket reads this one as its "previous" bucket, so state lives for two
        bucket lengths, plus the allowed lateness.
        """
        return (bucket + 2) * self.seconds + lateness_s


W10S = Window("10s", 10)
W1M = Window("1m", 60)
W1H = Window("1h", 3_600)
W1D = Window("1d", DAY_S)


@dataclass(frozen=True)
class CountSpec:
    """Clicks of an entity so far in the current bucket; optionally the previous total."""

    entity: str  # "user" or "ip"
    window: Window
    previous: bool = False

    @property
    def name(self) -> str:
        prefix = "u" if self.entity == "user" else "ip"
        return f"{prefix}_clicks_{self.window.name}"

    @property
    def previous_name(self) -> str:
        prefix = "u" if self.entity == "user" else "ip"
        return f"{prefix}_prev_clicks_{self.window.name}"


@dataclass(frozen=True)
class DistinctSpec:
    """Distinct ``member`` values seen with an entity so far in the current bucket, up to
    ``features.limits.MAX_DISTINCT_MEMBERS`` (64): the count saturates there, its state
    holds no more members."""

    entity: str  # "user" or "ip"
    member: str  # "ip", "session" or "user"
    window: Window

    @property
    def name(self) -> str:
        prefix = "u" if self.entity == "user" else "ip"
        return f"{prefix}_distinct_{self.member}_{self.window.name}"


# The velocity and entity counters of slidr (feature spec version in definitions.py).
COUNTS: tuple[CountSpec, ...] = (
    CountSpec("user", W10S),
    CountSpec("user", W1M, previous=True),
    CountSpec("user", W1H, previous=True),
    CountSpec("user", W1D),
    CountSpec("ip", W1M),
    CountSpec("ip", W1H, previous=True),
)
DISTINCTS: tuple[DistinctSpec, ...] = (
    DistinctSpec("user", "ip", W1D),
    DistinctSpec("user", "session", W1D),
    DistinctSpec("ip", "user", W1H),
    DistinctSpec("ip", "user", W1D),
    DistinctSpec("ip", "session", W1H),
)
# Gap since the user's previous click, looked up today and yesterday; capped beyond that.
GAP_CAP_S = 2 * DAY_S


@dataclass(frozen=True)
class ComboSpec:
    """Clicks of one combination of click fields (e.g. an IP with an app) so far in the
    current bucket of each of ``windows``.

    ``fields`` are top-level click fields (``ip``, ``user_id``, ``ad_id``, ``user_agent``,
    ...) or ``context.<key>``; a missing one contributes "". A combination spans users,
    so its state is shared between workers (Redis), like an IP's.
    """

    name: str  # names its columns, "<name>_clicks_<window>", and its state entities
    fields: tuple[str, ...]
    windows: tuple[Window, ...]

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or not self.fields or not self.windows:
            raise ValueError(f"combination {self.name!r}: a plain name, fields and windows")

    @property
    def names(self) -> tuple[str, ...]:
        """Its feature columns, one per window."""
        return tuple(f"{self.name}_clicks_{w.name}" for w in self.windows)


# Entity counters over combinations: on app-install traffic (TalkingData) the clicks of an
# IP on one app carry much of the signal. Each combination and window costs the shared
# store an INCR and an EXPIRE per click: with ip x app, ip x device x os (x agent) and
# user x ad over 1 h and 1 day, the in-process scoring path took 42-47 us a click against
# 27-30 before (three interleaved runs of 40k clicks, batches of 500, private Valkey);
# with ip x app over one day alone, 28-32 us (+3% at the median). So one ships; add
# combinations here (e.g. ComboSpec("ip_device_os", ("ip", "context.device",
# "context.os", "user_agent"), (W1D,)), or ("user_id", "ad_id", "context.app")) where
# their signal is worth that cost: the feature spec, the parity tests and the Redis
# plans follow this tuple.
COMBOS: tuple[ComboSpec, ...] = (ComboSpec("ip_app", ("ip", "context.app"), (W1D,)),)
