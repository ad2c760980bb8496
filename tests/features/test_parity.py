"""The vectorised offline features equal the incremental per-event ones, click by click."""

from __future__ import annotations

import numpy as np
import pytest

from data.dataset import clicks_from_rows
from events.schemas import parse_click
from features.batch import compute_features
from features.definitions import (
    EMBEDDINGS,
    FEATURE_NAMES,
    ID_COLUMN,
    ClickFeaturizer,
    combo_entities_function,
    combo_entity,
)
from features.limits import MAX_DISTINCT_MEMBER_CHARS, MAX_DISTINCT_MEMBERS
from features.store import MemoryStore
from features.windows import COMBOS, W1D, ComboSpec

AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    "ShopApp/5.2.1 (Linux; Android 14; Pixel 8)",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "",
]
QUERIES = [
    "running shoes",
    "  Red   RUNNING shoes for Men  ",  # more tokens than there are columns, mixed case
    "ÜBER straße",
    "a",
    "",
]


def _context(rng: np.random.Generator) -> dict | None:
    """The simulator's context, app traffic's ids, keys without an id table of their own
    (more than there are columns for them), empty values, or none at all."""
    kind = rng.integers(0, 5)
    if kind == 0:
        return {"publisher": f"p{rng.integers(0, 4)}", "channel": f"ch{rng.integers(0, 2)}"}
    if kind == 1:
        return {
            "zone": f"z{rng.integers(0, 3)}",
            "site": f"s{rng.integers(0, 2)}",
            "campaign": f"k{rng.integers(0, 2)}",
            "publisher": "p1",
        }
    if kind == 2:
        return {"app": "", "os": f"{rng.integers(0, 3)}", "zz": ""}
    if kind == 3:
        return {"app": f"{rng.integers(0, 3)}", "topic": 'a|b\x1f"q"'}  # key-format characters
    return None


def talkingdata_click(i: int, ts: float, rng: np.random.Generator) -> dict:
    """An app-install click as TalkingData records it: ip, ids of app, os, device and
    channel, and nothing else (no agent, no ad fields)."""
    return {
        "click_id": f"t{i}",
        "ts": ts,
        "user_id": f"u{rng.integers(0, 12)}",
        "ip": f"10.0.0.{rng.integers(0, 6)}",
        "context": {
            "app": f"{rng.integers(1, 4)}",
            "os": f"{rng.integers(10, 13)}",
            "device": f"{rng.integers(1, 3)}",
            "channel": f"{rng.integers(100, 103)}",
        },
    }


def random_clicks(n: int, seed: int) -> list[dict]:
    """Clicks with heavy key reuse, bucket boundaries, equal timestamps and day gaps, and
    ad contexts of every shape (see ``_context``), a quarter of them TalkingData's."""
    rng = np.random.default_rng(seed)
    start = 1_762_041_600.0  # a UTC midnight
    ts = np.sort(
        start + rng.choice([5.0, 50.0, 3000.0, 90_000.0], n) * rng.random(n).cumsum() / n * 40
    )
    ts[10:20] = ts[10]  # ties keep input order
    rows = []
    for i in range(n):
        if rng.random() < 0.25:
            rows.append(parse_click(talkingdata_click(i, float(ts[i]), rng)))
            continue
        click = {
            "click_id": f"c{i}",
            "ts": float(ts[i]),
            "user_id": f"u{rng.integers(0, 12)}",
            "ip": f"10.0.0.{rng.integers(0, 6)}",
            "user_agent": AGENTS[rng.integers(0, len(AGENTS))],
            "logged_in": bool(rng.random() < 0.4),
            "ad_id": f"ad{rng.integers(0, 30)}",
            "placement": ["search_top", "homepage"][rng.integers(0, 2)],
            "context": {"publisher": f"p{rng.integers(0, 4)}"},
        }
        if rng.random() < 0.7:
            click["session_id"] = f"s{rng.integers(0, 20)}"
        if rng.random() < 0.3:
            click["device"] = ["desktop", "mobile", "app", "tv"][rng.integers(0, 4)]
        if rng.random() < 0.2:
            del click["ad_id"]
        if rng.random() < 0.6:
            click["advertiser_id"] = f"adv{rng.integers(0, 5)}"
        context = _context(rng)
        if context is None:
            del click["context"]
        else:
            click["context"].update(context)
        if rng.random() < 0.5:
            click["query"] = QUERIES[rng.integers(0, len(QUERIES))]
        rows.append(parse_click(click))
    return rows


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_batch_features_equal_incremental(batch_size: int) -> None:
    rows = random_clicks(600, seed=batch_size)
    cols = clicks_from_rows(rows)
    expected, expected_slices = compute_features(cols)

    featurizer = ClickFeaturizer(MemoryStore(), MemoryStore())
    ordered = [cols.row(i) for i in range(len(cols))]
    got, slices = [], []
    for start in range(0, len(ordered), batch_size):
        out = featurizer.featurize(ordered[start : start + batch_size])
        got.append(out.matrix)
        slices.extend(out.slices)
    got = np.vstack(got)

    for j, name in enumerate(FEATURE_NAMES):
        np.testing.assert_allclose(got[:, j], expected[:, j], rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(got[:, ID_COLUMN:], expected[:, ID_COLUMN:])  # exact ids
    assert slices == list(expected_slices)
    # The data exercise what they claim: every id column and combination is busy.
    ids = got[:, ID_COLUMN:]
    for j, column in enumerate(EMBEDDINGS):
        assert 0 < np.count_nonzero(ids[:, j]) < len(ids), column.name
    col = {name: np.expm1(got[:, j]) for j, name in enumerate(FEATURE_NAMES[:ID_COLUMN])}
    for name in (n for combo in COMBOS for n in combo.names):
        assert col[name].max() > 3, name


def test_counters_see_what_they_claim() -> None:
    rows = [
        parse_click(
            {"click_id": f"c{i}", "ts": 1_000_000.0 + i, "user_id": "u", "ip": f"1.1.1.{i % 2}"}
        )
        for i in range(5)
    ]
    out = ClickFeaturizer(MemoryStore(), MemoryStore()).featurize(rows)
    col = {name: np.expm1(out.matrix[:, j]) for j, name in enumerate(FEATURE_NAMES[:ID_COLUMN])}
    np.testing.assert_allclose(col["u_clicks_1m"], [1, 2, 3, 4, 5], rtol=1e-5)
    np.testing.assert_allclose(col["u_distinct_ip_1d"], [1, 2, 2, 2, 2], rtol=1e-5)
    np.testing.assert_allclose(col["u_gap_s"][1:], [1, 1, 1, 1], rtol=1e-5)
    np.testing.assert_allclose(col["ip_app_clicks_1d"], [1, 1, 2, 2, 3], rtol=1e-5)


def test_combination_counters_span_users_and_tell_values_apart() -> None:
    def click(i: int, user: str, app: str | None, agent: str = "") -> dict:
        row = {
            "click_id": f"c{i}",
            "ts": 1_000_000.0 + i,
            "user_id": user,
            "ip": "1.1.1.1",
            "user_agent": agent,
        }
        if app is not None:
            row["context"] = {"app": app}
        return parse_click(row)

    rows = [
        click(0, "u1", "7"),
        click(1, "u2", "7"),  # another user, same ip x app
        click(2, "u1", "8"),
        click(3, "u1", None),  # no app: counted under ip x ""
        click(4, "u1", ""),  # an empty app is the same as none
        click(5, "u1", "7", agent="Mozilla/5.0"),
    ]
    out = ClickFeaturizer(MemoryStore(), MemoryStore()).featurize(rows)
    col = {name: np.expm1(out.matrix[:, j]) for j, name in enumerate(FEATURE_NAMES[:ID_COLUMN])}
    np.testing.assert_allclose(col["ip_app_clicks_1d"], [1, 2, 1, 1, 2, 3], rtol=1e-5)


class _RoutedMemory(MemoryStore):
    """Per-partition memory stores behind the worker's ``execute_routed_rows`` interface."""

    def __init__(self) -> None:
        super().__init__()
        self.partitions: dict[int, MemoryStore] = {}

    def execute_routed_rows(self, plan, rows: dict, now: float = 0.0) -> dict:
        return {
            p: self.partitions.setdefault(p, MemoryStore()).execute_rows(plan, r, now)
            for p, r in rows.items()
        }


def test_routing_user_state_by_partition_changes_no_feature() -> None:
    # The worker keeps each user's state in the partition that owns the user's clicks.
    rows = random_clicks(400, seed=3)
    partitions = [int(row["user_id"][1:]) % 4 for row in rows]
    plain = ClickFeaturizer(MemoryStore(), MemoryStore())
    routed_store = _RoutedMemory()
    routed = ClickFeaturizer(routed_store, MemoryStore())
    for start in range(0, len(rows), 64):
        chunk = rows[start : start + 64]
        a = plain.featurize(chunk)
        b = routed.featurize(chunk, partitions[start : start + 64])
        np.testing.assert_array_equal(a.matrix, b.matrix)
    assert len(routed_store.partitions) == 4
    assert sum(len(s) for s in routed_store.partitions.values()) == len(
        {r["user_id"] for r in rows}
    )


def test_the_per_click_entities_are_combo_entity() -> None:
    """The worker's generated per-click function names each combination as
    ``combo_entity`` does, for every shape of click; long values enter as digests, so two
    agents that differ only past the first characters still count apart."""
    long_a, long_b = "Mozilla/5.0 " + "x" * 40 + "a", "Mozilla/5.0 " + "x" * 40 + "b"
    extra = [
        parse_click(
            {"click_id": "l1", "ts": 1.0, "user_id": "u", "ip": "1.1.1.1", "user_agent": long_a}
        ),
        parse_click(
            {"click_id": "l2", "ts": 1.0, "user_id": "u", "ip": "1.1.1.1", "user_agent": long_b}
        ),
    ]
    # The shipped combinations and two of several fields (with the agent, with a missing
    # context key): the generated function must handle any declaration.
    specs = (
        *COMBOS,
        ComboSpec("ip_device_os", ("ip", "context.device", "context.os", "user_agent"), (W1D,)),
        ComboSpec("user_ad", ("user_id", "ad_id", "context.app"), (W1D,)),
    )
    entities = combo_entities_function(specs)
    for click in [*random_clicks(300, seed=9), *extra]:
        context = click.get("context") or {}
        expected = tuple(
            combo_entity(
                c,
                [
                    (context.get(f[8:]) if f.startswith("context.") else click.get(f)) or ""
                    for f in c.fields
                ],
            )
            for c in specs
        )
        assert entities(click) == expected
    assert entities(extra[0]) != entities(extra[1])
    assert all(len(e) < 100 for e in entities(extra[0]))


def _rotating_clicks() -> list[dict]:
    """One user rotating IPs and sessions, and one IP shared by ever new users and
    sessions, well past the distinct sets' cap within a day (and an hour); some ids longer
    than the members' length bound, so they count as digests online."""
    rows = []
    for i in range(3 * MAX_DISTINCT_MEMBERS):
        ts = 1_762_041_600.0 + 10.0 * i  # all within the first hour
        long_tail = "x" * (MAX_DISTINCT_MEMBER_CHARS + i % 3)  # some ids only differ late
        rows.append(
            parse_click(
                {
                    "click_id": f"r{i}",
                    "ts": ts,
                    "user_id": "rotator",
                    "ip": f"10.1.{i // 250}.{i % 250}" if i % 2 else f"{long_tail}-ip{i}",
                    "session_id": f"s{i}" if i % 3 else f"{long_tail}-s{i}",
                }
            )
        )
        rows.append(
            parse_click(
                {
                    "click_id": f"n{i}",
                    "ts": ts + 5.0,
                    "user_id": f"u{i}" if i % 2 else f"{long_tail}-u{i}",
                    "ip": "198.51.100.1",
                    "session_id": f"t{i % (2 * MAX_DISTINCT_MEMBERS)}",  # repeats past it
                }
            )
        )
        if i % 5 == 0:  # a member seen before, after the set is full: no change
            rows.append(parse_click({**rows[-2], "click_id": f"again{i}", "ts": ts + 6.0}))
    return rows


@pytest.mark.parametrize("batch_size", [1, 64, 1000])
def test_distinct_counts_saturate_at_the_cap_on_both_paths(batch_size: int) -> None:
    rows = _rotating_clicks()
    cols = clicks_from_rows(rows)
    expected, _ = compute_features(cols)
    featurizer = ClickFeaturizer(MemoryStore(), MemoryStore())
    ordered = [cols.row(i) for i in range(len(cols))]
    got = np.vstack(
        [
            featurizer.featurize(ordered[s : s + batch_size]).matrix
            for s in range(0, len(ordered), batch_size)
        ]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    col = {name: np.expm1(got[:, j]) for j, name in enumerate(FEATURE_NAMES[:ID_COLUMN])}
    user = np.array([r["user_id"] == "rotator" for r in ordered])
    for name in ("u_distinct_ip_1d", "u_distinct_session_1d"):
        np.testing.assert_allclose(col[name][user].max(), MAX_DISTINCT_MEMBERS, rtol=1e-5)
    shared = np.array([r["ip"] == "198.51.100.1" for r in ordered])
    for name in ("ip_distinct_user_1h", "ip_distinct_user_1d", "ip_distinct_session_1h"):
        np.testing.assert_allclose(col[name][shared].max(), MAX_DISTINCT_MEMBERS, rtol=1e-5)
    # Below the cap the counts still climb one by one (the first 64 users of the IP).
    first = col["ip_distinct_user_1d"][shared][:MAX_DISTINCT_MEMBERS]
    np.testing.assert_allclose(first, np.arange(1, MAX_DISTINCT_MEMBERS + 1), rtol=1e-5)
    # The state holds no more than the cap, whatever was added.
    for store in (featurizer.user_store, featurizer.ip_store):
        for record in store._records.values():
            for value, _expire_at in record.values():
                if isinstance(value, list):
                    assert len(value) <= MAX_DISTINCT_MEMBERS
                    assert all(len(m) <= MAX_DISTINCT_MEMBER_CHARS + 1 for m in value)
