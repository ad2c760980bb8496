"""The worker's customer RFM cache: the offline job's snapshot plus live purchases.

Read-only input from the registry (``rfm_snapshot.parquet`` of the active version:
last purchase time, purchase count and amount per customer over the lookback), updated
with every purchase the worker consumes. Decisions of logged-in clicks carry the
customer's RFM score, so billing and the live monitor can tell vouched-for customers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
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
                    table["customer_id"],
                    table["last_ts"],
                    table["count"],
                    table["amount"],
                    strict=True,
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

    def scores(self, clicks: list[dict]) -> list[float | None]:
        """RFM score of each click's customer at the click's event time; None for clicks
        without a customer or with one never seen. One formula call for the batch: the
        formula is numpy, and called per click it cost more than the rest of the lookup."""
        found = []  # (position, entry, ts)
        for i, click in enumerate(clicks):
            customer = click.get("customer_id")
            entry = self.customers.get(customer) if customer else None
            if entry is not None:
                found.append((i, entry, click["ts"]))
        out: list[float | None] = [None] * len(clicks)
        if found:
            recency = np.array([max(0.0, (ts - e[0]) / DAY_S) for _, e, ts in found])
            count = np.array([e[1] for _, e, _ in found], dtype=np.float64)
            amount = np.array([e[2] for _, e, _ in found], dtype=np.float64)
            values = rfm_formula(recency, count, amount, self.policy).tolist()
            for (i, _, _), value in zip(found, values, strict=True):
                out[i] = value
        return out

    def expire(self, before: float) -> None:
        """Forget customers whose last purchase is older than ``before``."""
        stale = [c for c, e in self.customers.items() if e[0] < before or math.isinf(e[0])]
        for c in stale:
            del self.customers[c]
