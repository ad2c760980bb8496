"""The worker's customer RFM cache: the offline job's snapshot plus live purchases.

Read-only input from the registry (``rfm_snapshot.parquet`` of the active version:
last purchase time, purchase count and amount per customer over the lookback), updated
with every purchase the worker consumes. Decisions of logged-in clicks carry the
customer's RFM score, so billing and the live monitor can tell vouched-for customers.

The cache holds at most ``max_customers`` (``SLIDR_RFM_CACHE_SIZE``, 1,000,000 by
default): a purchase or a click's lookup marks its customer as used, and the customer
unused the longest is forgotten first, so the decisions of a customer it forgot carry
no RFM score (verdicts do not depend on it; the live monitor counts fewer known
humans). An entry, a customer id and three numbers, takes about 280 bytes with a
36-character id (195 bytes besides the id under ``tracemalloc``), so the default bound
is ~280 MB.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from features.windows import DAY_S
from models.labels import RfmPolicy, rfm_formula

DEFAULT_MAX_CUSTOMERS = 1_000_000


class RfmCache:
    def __init__(
        self, policy: RfmPolicy | None = None, max_customers: int = DEFAULT_MAX_CUSTOMERS
    ) -> None:
        if max_customers < 1:
            raise ValueError(f"max_customers must be at least 1, got {max_customers}")
        self.policy = policy or RfmPolicy()
        self.max_customers = max_customers
        # customer_id -> [last_ts, count, amount], least recently used first
        self.customers: OrderedDict[str, list] = OrderedDict()

    @classmethod
    def from_version(cls, folder: Path, max_customers: int = DEFAULT_MAX_CUSTOMERS) -> RfmCache:
        """The version's snapshot; when it holds more customers than fit, those who
        bought most recently (they count as the most recently used)."""
        cache = cls(max_customers=max_customers)
        path = folder / "rfm_snapshot.parquet"
        if path.exists():
            table = pq.read_table(path).to_pydict()
            rows = sorted(
                zip(
                    table["last_ts"],
                    table["customer_id"],
                    table["count"],
                    table["amount"],
                    strict=True,
                ),
                key=lambda row: row[0],
            )
            cache.customers = OrderedDict((c, [t, n, a]) for t, c, n, a in rows[-max_customers:])
        return cache

    def add(self, purchase: dict) -> None:
        """Fold a live purchase in (purchases without a customer are ignored)."""
        customer = purchase.get("customer_id")
        if not customer:
            return
        customers = self.customers
        entry = customers.get(customer)
        if entry is None:
            customers[customer] = [purchase["ts"], 1, purchase["amount"]]
            if len(customers) > self.max_customers:
                customers.popitem(last=False)
        else:
            customers.move_to_end(customer)
            entry[0] = max(entry[0], purchase["ts"])
            entry[1] += 1
            entry[2] += purchase["amount"]

    def scores(self, clicks: list[dict]) -> list[float | None]:
        """RFM score of each click's customer at the click's event time; None for clicks
        without a customer or with one never seen. One formula call for the batch: the
        formula is numpy, and called per click it cost more than the rest of the lookup."""
        found = []  # (position, entry, ts)
        customers = self.customers
        for i, click in enumerate(clicks):
            customer = click.get("customer_id")
            if not customer:
                continue
            entry = customers.get(customer)
            if entry is not None:
                customers.move_to_end(customer)  # used: forgotten last
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
