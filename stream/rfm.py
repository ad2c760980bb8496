"""The worker's customer RFM cache: the offline job's snapshot plus live purchases.

Read-only input from the registry (``rfm_snapshot.parquet`` of the active version:
last purchase time, purchase count and amount per customer over the lookback), updated
with every purchase the worker consumes. Decisions of logged-in clicks carry the
customer's RFM score, so billing and the live monitor can tell vouched-for customers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq

from features.windows import DAY_S
from models.labels import RfmPolicy, rfm_formula


class RfmCache:
    def __init__(self, policy: RfmPolicy | None = None) -> None:
        self.policy = policy or RfmPolicy()
        self.customers: dict[str, list] = {}  # customer_id -> [last_ts, count, amount]

    @classmethod
    def from_version(cls, folder: Path) -> RfmCache:
        cache = cls()
        path = folder / "rfm_snapshot.parquet"
        if path.exists():
            table = pq.read_table(path).to_pydict()
            cache.customers = {
                c: [t, n, a]
                for c, t, n, a in zip(
                    table["customer_id"], table["last_ts"], table["count"], table["amount"], strict=True
                )
            }
        return cache

    def add(self, purchase: dict) -> None:
        """Fold a live purchase in (purchases without a customer are ignored)."""
        customer = purchase.get("customer_id")
        if not customer:
            return
        entry = self.customers.get(customer)
        if entry is None:
            self.customers[customer] = [purchase["ts"], 1, purchase["amount"]]
        else:
            entry[0] = max(entry[0], purchase["ts"])
            entry[1] += 1
            entry[2] += purchase["amount"]

    def score(self, customer_id: str | None, ts: float) -> float | None:
        """RFM score of a customer at event time ``ts``; None when unknown."""
        entry = self.customers.get(customer_id) if customer_id else None
        if entry is None:
            return None
        recency = max(0.0, (ts - entry[0]) / DAY_S)
        return float(rfm_formula(recency, entry[1], entry[2], self.policy))

    def expire(self, before: float) -> None:
        """Forget customers whose last purchase is older than ``before``."""
        stale = [c for c, e in self.customers.items() if e[0] < before or math.isinf(e[0])]
        for c in stale:
            del self.customers[c]
