"""The vectorised offline features equal the incremental per-event ones, click by click."""

from __future__ import annotations

import numpy as np
import pytest

from features.batch import compute_features
from features.definitions import FEATURE_NAMES, ClickFeaturizer
from features.store import MemoryStore
from models.dataset import clicks_from_rows
from stream.schemas import parse_click

AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    "ShopApp/5.2.1 (Linux; Android 14; Pixel 8)",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "",
]


def random_clicks(n: int, seed: int) -> list[dict]:
    """Clicks with heavy key reuse, bucket boundaries, equal timestamps and day gaps."""
    rng = np.random.default_rng(seed)
    start = 1_762_041_600.0  # a UTC midnight
    ts = np.sort(start + rng.choice([5.0, 50.0, 3000.0, 90_000.0], n) * rng.random(n).cumsum() / n * 40)
    ts[10:20] = ts[10]  # ties keep input order
    rows = []
    for i in range(n):
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
    assert slices == list(expected_slices)


def test_counters_see_what_they_claim() -> None:
    rows = [
        parse_click({"click_id": f"c{i}", "ts": 1_000_000.0 + i, "user_id": "u", "ip": f"1.1.1.{i % 2}"})
        for i in range(5)
    ]
    out = ClickFeaturizer(MemoryStore(), MemoryStore()).featurize(rows)
    col = {name: np.expm1(out.matrix[:, j]) for j, name in enumerate(FEATURE_NAMES)}
    np.testing.assert_allclose(col["u_clicks_1m"], [1, 2, 3, 4, 5], rtol=1e-5)
    np.testing.assert_allclose(col["u_distinct_ip_1d"], [1, 2, 2, 2, 2], rtol=1e-5)
    np.testing.assert_allclose(col["u_gap_s"][1:], [1, 1, 1, 1], rtol=1e-5)


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
    assert sum(len(s) for s in routed_store.partitions.values()) == len({r["user_id"] for r in rows})
