"""The synthetic traffic simulator: contract (schema, order, ids, determinism) and realism."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from slidr.simulator import KINDS, SimulationSummary, simulate

START = "2026-11-02"  # a Monday
T0 = datetime(2026, 11, 2, tzinfo=UTC).timestamp()
DAY = 86_400.0

CLICK_SCHEMA = pa.schema(
    [
        ("click_id", pa.string()),
        ("ts", pa.float64()),
        ("user_id", pa.string()),
        ("ip", pa.string()),
        ("session_id", pa.string()),
        ("user_agent", pa.string()),
        ("logged_in", pa.bool_()),
        ("customer_id", pa.string()),
        ("device", pa.string()),
        ("ad_id", pa.string()),
        ("advertiser_id", pa.string()),
        ("placement", pa.string()),
        ("query", pa.string()),
        ("context", pa.struct([("publisher", pa.string()), ("channel", pa.string())])),
        ("is_bot", pa.bool_()),
        ("bot_kind", pa.string()),
    ]
)
PURCHASE_SCHEMA = pa.schema(
    [
        ("purchase_id", pa.string()),
        ("ts", pa.float64()),
        ("user_id", pa.string()),
        ("customer_id", pa.string()),
        ("click_id", pa.string()),
        ("amount", pa.float64()),
    ]
)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _np(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).to_numpy(zero_copy_only=False)


def _hour_of_day(ts: np.ndarray) -> np.ndarray:
    return ((ts - T0) % DAY // 3600).astype(int)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimulationSummary, pa.Table, pa.Table]:
    """Three days at 2,000 clicks a day, new robot kind from day 2."""
    out = tmp_path_factory.mktemp("tiny")
    messages: list[str] = []
    summary = simulate(out, days=3, seed=11, clicks_per_day=2_000, new_bot_day=2, start=START,
                       progress=messages.append)  # fmt: skip
    assert messages, "progress is called per stage"
    return summary, pq.read_table(out / "clicks.parquet"), pq.read_table(out / "purchases.parquet")


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, pa.Table]:
    """Enough clicks for hourly shapes (two weekdays at 30,000 clicks a day)."""
    out = tmp_path_factory.mktemp("medium")
    simulate(out, days=2, seed=3, clicks_per_day=30_000, start=START)
    return pq.read_table(out / "clicks.parquet"), pq.read_table(out / "purchases.parquet")


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    kw = {"days": 2, "clicks_per_day": 1_000, "new_bot_day": 1}
    a = simulate(tmp_path / "a", seed=5, **kw)
    b = simulate(tmp_path / "b", seed=5, **kw)
    c = simulate(tmp_path / "c", seed=6, **kw)
    for name in ("clicks.parquet", "purchases.parquet"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))
    assert a.clicks_by_kind == b.clicks_by_kind
    ca, cc = pq.read_table(a.path_clicks), pq.read_table(c.path_clicks)
    assert not ca.equals(cc)
    assert set(_np(ca, "user_id")).isdisjoint(set(_np(cc, "user_id")))


def test_schema_and_compression(tiny) -> None:
    summary, clicks, purchases = tiny
    assert clicks.schema.remove_metadata() == CLICK_SCHEMA
    assert purchases.schema.remove_metadata() == PURCHASE_SCHEMA
    meta = pq.ParquetFile(summary.path_clicks).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert summary.n_clicks == clicks.num_rows
    assert summary.n_purchases == purchases.num_rows
    assert sum(summary.clicks_by_kind.values()) == summary.n_clicks
    text = summary.to_text()
    assert "mimic" in text and f"{summary.n_clicks:,}" in text


def test_times_sorted_in_range_and_ids_unique(tiny) -> None:
    _, clicks, purchases = tiny
    ts = _np(clicks, "ts")
    assert np.all(np.diff(ts) >= 0)
    assert ts.min() >= T0 and ts.max() < T0 + 3 * DAY
    assert np.all(np.diff(_np(purchases, "ts")) >= 0)
    assert _np(purchases, "ts").max() < T0 + 3 * DAY
    click_ids = _np(clicks, "click_id")
    assert len(set(click_ids)) == len(click_ids)
    # Assigned in time order, so the first click is c00000000.
    assert click_ids[0] == "c00000000" and click_ids[-1] == f"c{len(click_ids) - 1:08d}"
    assert len(set(_np(purchases, "purchase_id"))) == purchases.num_rows
    assert all(s.count(".") == 3 for s in _np(clicks, "ip"))


def test_every_kind_present_and_bot_share(tiny) -> None:
    summary, clicks, _ = tiny
    kinds = _np(clicks, "bot_kind")
    assert set(kinds) == set(KINDS)
    assert np.array_equal(_np(clicks, "is_bot"), kinds != "human")
    assert 0.2 <= summary.bot_share <= 0.4


def test_field_consistency(tiny) -> None:
    _, clicks, _ = tiny
    logged_in = _np(clicks, "logged_in")
    has_customer = clicks.column("customer_id").is_valid().to_numpy(zero_copy_only=False)
    assert np.array_equal(logged_in, has_customer)
    placement = _np(clicks, "placement")
    has_query = clicks.column("query").is_valid().to_numpy(zero_copy_only=False)
    assert np.array_equal(has_query, np.isin(placement, ["search_top", "search_side"]))
    device = _np(clicks, "device")
    ua = _np(clicks, "user_agent")
    assert set(device) == {"desktop", "mobile", "app"}
    assert all("App/" in u for u in ua[device == "app"])
    assert not any("App/" in u for u in ua[device != "app"])
    assert set(device[placement == "app_feed"]) == {"app"}
    channel = (
        clicks.column("context").combine_chunks().field("channel").to_numpy(zero_copy_only=False)
    )
    assert np.array_equal(channel == "app", device == "app")


def test_bots_never_purchase(tiny) -> None:
    _, clicks, purchases = tiny
    by_id = dict(zip(_np(clicks, "click_id"), _np(clicks, "is_bot"), strict=True))
    attributed = [c for c in _np(purchases, "click_id") if c is not None]
    assert attributed
    assert not any(by_id[c] for c in attributed)
    bot_users = set(_np(clicks, "user_id")[_np(clicks, "is_bot")])
    assert bot_users.isdisjoint(set(_np(purchases, "user_id")))


def test_purchases_follow_their_click(tiny) -> None:
    _, clicks, purchases = tiny
    click_ts = dict(zip(_np(clicks, "click_id"), _np(clicks, "ts"), strict=True))
    p_click, p_ts = _np(purchases, "click_id"), _np(purchases, "ts")
    with_click = np.array([c is not None for c in p_click])
    delays = np.array(
        [t - click_ts[c] for c, t in zip(p_click[with_click], p_ts[with_click], strict=True)]
    )
    assert np.all(delays > 0)
    in_window = p_ts >= T0
    # About half of the in-window purchases carry the click; history never does.
    assert 0.3 < with_click[in_window].mean() < 0.7
    assert not with_click[~in_window].any()
    assert p_ts.min() >= T0 - 180 * DAY


def test_mimic_only_from_new_bot_day(tiny, tmp_path: Path) -> None:
    _, clicks, _ = tiny
    mimic_ts = _np(clicks, "ts")[_np(clicks, "bot_kind") == "mimic"]
    assert len(mimic_ts) > 0 and mimic_ts.min() >= T0 + 2 * DAY
    none = simulate(tmp_path, days=2, clicks_per_day=500, seed=1)
    assert "mimic" not in set(_np(pq.read_table(none.path_clicks), "bot_kind"))
    assert "mimic" not in none.clicks_by_kind


def test_humans_follow_the_clock_low_slow_does_not(medium) -> None:
    clicks, _ = medium
    hour = _hour_of_day(_np(clicks, "ts"))
    kinds = _np(clicks, "bot_kind")

    def night_over_evening(kind: str) -> float:
        h = np.bincount(hour[kinds == kind], minlength=24)
        return h[2:5].sum() / h[19:22].sum()

    assert night_over_evening("human") < 0.3
    assert 0.75 < night_over_evening("low_slow") < 1.33
    assert night_over_evening("hijacked") > 1.5  # worked while owners sleep


def test_identity_signatures(medium) -> None:
    clicks, purchases = medium
    kinds = _np(clicks, "bot_kind")
    users, ips, ts = _np(clicks, "user_id"), _np(clicks, "ip"), _np(clicks, "ts")

    def per_user(kind: str) -> np.ndarray:
        return np.unique(users[kinds == kind], return_counts=True)[1]

    assert per_user("proxy_rotator").max() <= 5
    assert per_user("burst").max() >= 50
    assert np.median(per_user("human")) < 10
    # low_slow: one IP per identity
    m = kinds == "low_slow"
    pairs = {(u, i) for u, i in zip(users[m], ips[m], strict=True)}
    assert len(pairs) == len(set(users[m]))
    # Carrier CGNAT: some human IP carries many distinct users within one hour.
    h = kinds == "human"
    hour_ip = {}
    for u, i, t in zip(users[h], ips[h], ts[h] // 3600, strict=True):
        hour_ip.setdefault((i, t), set()).add(u)
    assert max(len(s) for s in hour_ip.values()) >= 10
    # Crawlers declare themselves; datacenter robots are partly headless.
    ua = _np(clicks, "user_agent")
    assert all(any(b in u for b in ("bot", "Bot")) for u in ua[kinds == "crawler"])
    assert any("HeadlessChrome" in u for u in ua[kinds == "datacenter"])
    # Hijacked accounts are real customers, mostly with a purchase history, some heavy
    # buyers among them, signed in from a device their owner never used.
    hijacked = set(_np(clicks, "customer_id")[kinds == "hijacked"])
    assert None not in hijacked
    history = _np(purchases, "customer_id")[_np(purchases, "ts") < T0]
    names, counts = np.unique(history.astype(str), return_counts=True)
    n_history = dict(zip(names, counts, strict=True))
    assert np.mean([c in n_history for c in hijacked]) > 0.6
    assert max(n_history.get(c, 0) for c in hijacked) >= 10
    assert set(users[kinds == "hijacked"]).isdisjoint(users[kinds == "human"])


def test_customers_differ_in_frequency(medium) -> None:
    _, purchases = medium
    history = _np(purchases, "customer_id")[_np(purchases, "ts") < T0]
    assert None not in set(history)
    counts = np.unique(history.astype(str), return_counts=True)[1]
    assert np.median(counts) <= 3 and counts.max() >= 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"days": 0}, "days"),
        ({"clicks_per_day": 99}, "clicks_per_day"),
        ({"days": 3, "new_bot_day": 0}, "new_bot_day"),
        ({"days": 3, "new_bot_day": 3}, "new_bot_day"),
        ({"days": 1, "new_bot_day": 1}, "new_bot_day"),
        ({"start": "next monday"}, "start"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate(tmp_path, **kwargs)
    assert not (tmp_path / "clicks.parquet").exists()
