"""The worker's RFM cache: live purchases fold in, and each click gets its customer's score."""

from __future__ import annotations

import pytest

from features.windows import DAY_S
from models.labels import RfmPolicy
from stream.rfm import RfmCache

T0 = 1_762_041_600.0


def test_scores_follow_recency_frequency_and_amount() -> None:
    policy = RfmPolicy()
    cache = RfmCache(policy)
    for i in range(int(policy.frequent_purchases)):  # enough purchases to max out frequency
        cache.add(
            {
                "purchase_id": f"p{i}",
                "ts": T0 + i,
                "user_id": "u",
                "customer_id": "big",
                "amount": policy.valuable_amount,
            }
        )
    cache.add({"purchase_id": "q", "ts": T0, "user_id": "v", "customer_id": "small", "amount": 0.0})
    cache.add({"purchase_id": "r", "ts": T0, "user_id": "w", "customer_id": None, "amount": 5.0})
    last = T0 + policy.frequent_purchases - 1
    clicks = [
        {"ts": last, "customer_id": "big"},  # just bought, often, a lot
        {"ts": last + policy.stale_days * DAY_S, "customer_id": "big"},  # long ago now
        {"ts": T0, "customer_id": "small"},  # one purchase of nothing, just now
        {"ts": T0, "customer_id": "stranger"},
        {"ts": T0},
    ]
    scores = cache.scores(clicks)
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(2 / 3)  # recency gone, frequency and amount stay
    assert scores[2] == pytest.approx((1.0 + 1 / policy.frequent_purchases) / 3)
    assert scores[3:] == [None, None]
    assert cache.scores([]) == []


def test_expire_forgets_customers_who_stopped_buying() -> None:
    cache = RfmCache()
    cache.add({"purchase_id": "p", "ts": T0, "user_id": "u", "customer_id": "c", "amount": 1.0})
    cache.expire(T0 + 1)
    assert cache.scores([{"ts": T0 + 2, "customer_id": "c"}]) == [None]


def _purchase(customer: str, ts: float) -> dict:
    return {
        "purchase_id": f"p-{customer}",
        "ts": ts,
        "user_id": "u",
        "customer_id": customer,
        "amount": 1.0,
    }


def test_the_cache_holds_at_most_its_size_and_forgets_the_least_recently_used() -> None:
    cache = RfmCache(max_customers=3)
    for i, customer in enumerate("abc"):
        cache.add(_purchase(customer, T0 + i))
    assert cache.scores([{"ts": T0, "customer_id": "a"}])[0] is not None  # "a" is used again
    cache.add(_purchase("d", T0 + 3))  # "b" has gone longest without use
    assert len(cache.customers) == 3
    known = cache.scores([{"ts": T0 + 4, "customer_id": c} for c in "abcd"])
    assert [score is not None for score in known] == [True, False, True, True]
    for i in range(100):
        cache.add(_purchase(f"x{i}", T0 + 10 + i))
    assert len(cache.customers) == 3


def test_a_snapshot_larger_than_the_cache_keeps_its_latest_purchasers(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "customer_id": ["old", "newest", "middle", "oldest"],
                "last_ts": [T0 - 3 * DAY_S, T0, T0 - DAY_S, T0 - 9 * DAY_S],
                "count": [1, 2, 3, 4],
                "amount": [1.0, 2.0, 3.0, 4.0],
            }
        ),
        tmp_path / "rfm_snapshot.parquet",
    )
    cache = RfmCache.from_version(tmp_path, max_customers=2)
    assert sorted(cache.customers) == ["middle", "newest"]
    assert cache.customers["newest"] == [T0, 2, 2.0]
