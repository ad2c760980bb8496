"""State of users and IPs that went quiet is forgotten, on event time."""

from __future__ import annotations

from events.schemas import parse_click
from features.definitions import ClickFeaturizer
from features.store import MemoryStore
from features.windows import COMBOS, DAY_S

START = 1_762_041_600.0  # a UTC midnight


def _click(i: int, ts: float, user: str, ip: str) -> dict:
    return parse_click({"click_id": f"c{i}", "ts": ts, "user_id": user, "ip": ip})


def test_quiet_entities_are_forgotten_after_their_windows() -> None:
    users, ips = MemoryStore(), MemoryStore()
    featurizer = ClickFeaturizer(users, ips)
    featurizer.featurize([_click(0, START, "quiet", "9.9.9.9")])
    # The shared store holds the IP and each of the click's combinations (ip x app, ...).
    assert len(users) == 1 and len(ips) == 1 + len(COMBOS)
    # Others keep clicking for three days; the longest window (a day, read as the
    # previous bucket the next day) plus the allowed lateness is then long past.
    for hour in range(1, 72):
        featurizer.featurize([_click(hour, START + hour * 3600, "busy", "1.1.1.1")])
    # only "busy", its IP and its combinations remain
    assert len(users) == 1 and len(ips) == 1 + len(COMBOS)


def test_sweeps_wait_for_the_wall_clock_interval() -> None:
    users = MemoryStore()
    featurizer = ClickFeaturizer(users, MemoryStore(), min_sweep_interval_s=3600.0)
    featurizer.featurize([_click(0, START, "quiet", "9.9.9.9")])  # sweeps (nothing to drop)
    featurizer.featurize([_click(1, START + 3 * DAY_S, "busy", "1.1.1.1")])
    # Event time moved three days, but the next sweep is an hour of wall time away.
    assert len(users) == 2
    featurizer.min_sweep_interval_s = 0.0
    featurizer.featurize([_click(2, START + 3 * DAY_S + 1, "busy", "1.1.1.1")])
    assert len(users) == 1
