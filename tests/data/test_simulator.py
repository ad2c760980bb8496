"""The synthetic traffic simulator: contract (schema, order, ids, determinism) and realism."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.dataset import load_dataset
from data.simulator import KINDS, PROXY_LIES_KINDS, WORLDS, SimulationSummary, simulate
from events.arrow import arrow_schema
from events.declarations import CLICK, PURCHASE
from features.batch import compute_features
from models.labels import make_labels
from slidr.cli import build_parser, main

START = "2026-11-02"  # a Monday
T0 = datetime(2026, 11, 2, tzinfo=UTC).timestamp()
DAY = 86_400.0

# The simulator writes every declared field (events.declarations) in its order; the
# context as a struct of its two keys, then the ground truth.
_CLICKS_DECLARED = arrow_schema(CLICK)
CLICK_SCHEMA = pa.schema(
    [_CLICKS_DECLARED.field(name) for name in CLICK.names if name != "context"]
    + [
        ("context", pa.struct([("publisher", pa.string()), ("channel", pa.string())])),
        ("is_bot", pa.bool_()),
        ("bot_kind", pa.string()),
    ]
)
PURCHASE_SCHEMA = arrow_schema(PURCHASE)


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
    summary = simulate(
        out,
        days=3,
        seed=11,
        clicks_per_day=2_000,
        new_bot_day=2,
        start=START,
        progress=messages.append,
    )
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
    assert set(kinds) == set(KINDS) - set(PROXY_LIES_KINDS)
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
        ({"world": "lying"}, "world"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        simulate(tmp_path, **kwargs)
    assert not (tmp_path / "clicks.parquet").exists()


# --------------------------------------------------------------------------------------
# The proxy_lies world: purchasers are not a representative sample of humans.
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lies(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Four weekdays at 20,000 clicks a day in proxy_lies, with weak labels and slices."""
    out = tmp_path_factory.mktemp("proxy_lies")
    summary = simulate(out, days=4, seed=11, clicks_per_day=20_000, start=START, world="proxy_lies")
    data = load_dataset(out)
    clicks = data.clicks
    _, slices = compute_features(clicks)
    kind = clicks.extra["bot_kind"].astype(str)
    return SimpleNamespace(
        summary=summary,
        out=out,
        clicks=clicks,
        purchases=pq.read_table(out / "purchases.parquet"),
        labels=make_labels(clicks, data.purchases),
        slices=slices.astype(str),
        kind=kind,
        human=kind == "human",
    )


def test_standard_is_the_default_world(tmp_path: Path) -> None:
    kw = {"days": 2, "seed": 4, "clicks_per_day": 2_000, "new_bot_day": 1}
    default = simulate(tmp_path / "default", **kw)
    standard = simulate(tmp_path / "standard", world="standard", **kw)
    for name in ("clicks.parquet", "purchases.parquet"):
        assert _sha(tmp_path / "default" / name) == _sha(tmp_path / "standard" / name)
    assert default.clicks_by_kind == standard.clicks_by_kind
    assert default.world == "standard" and not default.human_segments
    assert not set(PROXY_LIES_KINDS) & set(default.clicks_by_kind)
    assert "world" not in default.to_text()
    assert set(_np(pq.read_table(default.path_clicks), "device")) == {"desktop", "mobile", "app"}


def test_proxy_lies_same_seed_same_bytes(tmp_path: Path) -> None:
    kw = {"days": 2, "clicks_per_day": 3_000, "world": "proxy_lies"}
    simulate(tmp_path / "a", seed=8, **kw)
    simulate(tmp_path / "b", seed=8, **kw)
    simulate(tmp_path / "std", seed=8, days=2, clicks_per_day=3_000)
    for name in ("clicks.parquet", "purchases.parquet"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)
        assert _sha(tmp_path / "a" / name) != _sha(tmp_path / "std" / name)


def test_proxy_lies_kinds_truth_and_bot_share(lies) -> None:
    summary = lies.summary
    assert summary.world == "proxy_lies" and "proxy_lies" in summary.to_text()
    assert set(lies.kind) == set(KINDS) - {"mimic"}
    assert set(summary.clicks_by_kind) == set(KINDS) - {"mimic"}
    assert np.array_equal(lies.clicks.extra["is_bot"].astype(bool), ~lies.human)
    assert 0.20 <= summary.bot_share <= 0.35
    # Signed-in robots: hijacked customer accounts.
    hijacked = lies.kind == "hijacked"
    assert hijacked.sum() > 0 and lies.clicks.logged_in[hijacked].all()
    assert (lies.kind == "proxy_rotator").sum() > 0


def test_proxy_lies_purchase_rate_depends_on_the_slice(lies) -> None:
    purchasing = lies.labels.purchasing
    rate = {}
    for name in sorted(set(lies.slices)):
        h = lies.human & (lies.slices == name)
        rate[name] = purchasing[h].mean()
        if name.endswith("/logged_out"):
            assert rate[name] < 0.003, (name, rate[name])
        else:
            assert rate[name] > 0.02, (name, rate[name])
    # Signed-in app users buy at a clearly different rate from signed-in web users.
    assert rate["app/logged_in"] > 1.4 * max(rate["desktop/logged_in"], rate["mobile/logged_in"])
    # Most app traffic is signed out (standard: about a fifth).
    app = lies.human & np.char.startswith(lies.slices, "app/")
    assert (~lies.clicks.logged_in[app]).mean() > 0.5
    # Guests never buy: every purchase names a customer.
    assert lies.purchases.column("customer_id").null_count == 0


def test_proxy_lies_comparison_browsers_never_buy(lies) -> None:
    """Human sessions of 10-40 clicks all 5-30 s apart are comparison browsers' (an ordinary
    session of 10 clicks has all its gaps in that range with odds of about 1e-4)."""
    c = lies.clicks
    h = np.flatnonzero(lies.human)
    session, ts = c.session_id[h], c.ts[h]
    order = np.lexsort((ts, session))
    session, ts, rows = session[order], ts[order], h[order]
    starts = np.flatnonzero(np.r_[True, session[1:] != session[:-1]])
    sizes = np.diff(np.r_[starts, len(session)])
    gaps = np.diff(ts)
    ok_gap = (gaps >= 5.0) & (gaps <= 30.0)
    comparing = []
    for first, size in zip(starts, sizes, strict=True):
        if 10 <= size <= 40 and ok_gap[first : first + size - 1].all():
            comparing.append(rows[first : first + size])
    assert len(comparing) >= 20
    comparer_rows = np.concatenate(comparing)
    assert 0.02 < len(comparer_rows) / len(h) < 0.12
    assert not lies.labels.purchasing[comparer_rows].any()
    assert not c.logged_in[comparer_rows].any()
    buyers = set(_np(lies.purchases, "user_id"))
    assert buyers.isdisjoint(set(c.user_id[comparer_rows]))
    segments = lies.summary.human_segments
    assert segments["comparison_browser"] >= len(comparer_rows)
    assert segments["guest"] > 0


def test_proxy_lies_other_slice_is_nearly_all_robots(lies) -> None:
    other = lies.slices == "other/logged_out"
    assert other.sum() > 500
    assert not (np.char.startswith(lies.slices, "other/") & ~other).any()
    robots = ~lies.human[other]
    assert robots.mean() > 0.95
    assert 5 <= (~robots).sum() == lies.summary.human_segments["other_device"]
    assert set(lies.kind[other]) == {"human", "script"}
    assert set(lies.kind[lies.kind == "script"]) <= set(lies.kind[other])
    agents = set(lies.clicks.user_agent[other & (lies.kind == "script")])
    assert "" in agents
    for tool in ("python-requests/", "curl/", "Go-http-client/"):
        assert any(a.startswith(tool) for a in agents), tool
    assert not lies.labels.purchasing[other].any()


def test_proxy_lies_robot_with_the_human_clock(lies) -> None:
    hour = _hour_of_day(lies.clicks.ts)
    humans = np.bincount(hour[lies.human], minlength=24)
    infected = np.bincount(hour[lies.kind == "infected_pc"], minlength=24)
    assert infected.sum() > 1_000
    assert np.corrcoef(humans, infected)[0, 1] > 0.7
    # Hidden browsers at their owners' home addresses, with their owners' agents.
    m = lies.kind == "infected_pc"
    assert set(lies.clicks.ip[m]) & set(lies.clicks.ip[lies.human])
    assert set(lies.clicks.user_id[m]).isdisjoint(set(lies.clicks.user_id[lies.human]))


def test_cli_world_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--days", "1", "--clicks-per-day", "2000", "--seed", "3"]
    code = main(["simulate", "--out", str(tmp_path / "cli"), *flags, "--world", "proxy_lies"])
    out = capsys.readouterr().out
    assert code == 0 and "world 'proxy_lies'" in out and "script" in out
    simulate(tmp_path / "api", days=1, clicks_per_day=2_000, seed=3, world="proxy_lies")
    assert _sha(tmp_path / "cli" / "clicks.parquet") == _sha(tmp_path / "api" / "clicks.parquet")
    assert main(["simulate", "--out", str(tmp_path / "std"), *flags]) == 0
    simulate(tmp_path / "std_api", days=1, clicks_per_day=2_000, seed=3)
    std = [_sha(tmp_path / d / "clicks.parquet") for d in ("std", "std_api")]
    assert std[0] == std[1]
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["simulate", "--out", str(tmp_path), "--world", "lying"])
    assert exc.value.code == 2
    for world in WORLDS:
        args = build_parser().parse_args(["simulate", "--out", str(tmp_path), "--world", world])
        assert args.world == world
