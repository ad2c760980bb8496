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
