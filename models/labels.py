"""Weak-supervision labels and balancing sample weights (SPEC §4).

There is no ground truth in production, so slidr labels a click *human* when it led to
a purchase, or when its customer has a high RFM score (recency, frequency and monetary
value of purchases made strictly before the click). Every other click is labelled
non-human: most of those are humans too, which is why the model is calibrated against a
false-positive budget on purchasing clicks rather than used at 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from features.columns import ClickColumns
from features.windows import DAY_S

if TYPE_CHECKING:
    from data.dataset import Purchases

ATTRIBUTION_WINDOW_S = 24 * 3600.0


@dataclass(frozen=True)
class RfmPolicy:
    """When a customer counts as high-RFM at the time of a click.

    Each component is scored in [0, 1]: recency 1 for a purchase within ``recent_days``
    and falling linearly to 0 at ``stale_days``; frequency as purchases in the last
    ``lookback_days`` over ``frequent_purchases``; monetary as their total over
    ``valuable_amount`` (both capped at 1). The RFM score is their mean.
    """

    recent_days: float = 30.0
    stale_days: float = 120.0
    lookback_days: float = 365.0
    frequent_purchases: float = 6.0
    valuable_amount: float = 400.0
    high_score: float = 0.6


@dataclass
class Labels:
    purchasing: np.ndarray  # bool: an attributed purchase followed the click
    rfm_score: np.ndarray  # float in [0, 1]; 0 for clicks without customer or history
    high_rfm: np.ndarray  # bool: rfm_score at or above the policy's high_score
    human: np.ndarray  # bool: purchasing or high RFM
    attributed_purchases: int
    unattributed_purchases: int

    @property
    def robot(self) -> np.ndarray:
        """The training target: 1 for clicks not labelled human."""
        return (~self.human).astype(np.float32)

    def summary(self) -> dict:
        n = len(self.human)
        return {
            "clicks": n,
            "purchasing_clicks": int(self.purchasing.sum()),
            "high_rfm_clicks": int(self.high_rfm.sum()),
            "human_labelled": int(self.human.sum()),
            "human_share": float(self.human.mean()) if n else None,
            "attributed_purchases": self.attributed_purchases,
            "unattributed_purchases": self.unattributed_purchases,
        }


def _shared_codes(*arrays: np.ndarray) -> list[np.ndarray]:
    """Integer codes over the union of several string arrays (None gets code -1)."""
    joined = pa.chunked_array([pa.array(a, type=pa.string()) for a in arrays]).combine_chunks()
    encoded = joined.dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    codes = np.where(np.isnan(codes.astype(float)), -1, codes).astype(np.int64)
    out, start = [], 0
    for a in arrays:
        out.append(codes[start : start + len(a)])
        start += len(a)
    return out


def _sorted_key(codes: np.ndarray, ts: np.ndarray, t0: float) -> np.ndarray:
    """A single sortable int64 per (entity code, event time in milliseconds)."""
    span = 10**13  # > 300 years in ms: codes never overlap
    return codes * span + np.round((ts - t0) * 1000).astype(np.int64)


def attribute_purchases(
    clicks: ClickColumns,
    purchase_ts: np.ndarray,
    purchase_user: np.ndarray,
    purchase_click: np.ndarray,
    window_s: float = ATTRIBUTION_WINDOW_S,
) -> tuple[np.ndarray, int, int]:
    """Mark clicks that led to a purchase.

    A purchase naming a ``click_id`` present in the data marks that click; one without
    marks the same user's latest click at or before the purchase, within ``window_s``.
    Returns (purchasing flags, attributed purchases, unattributed purchases).
    """
    n = len(clicks)
    purchasing = np.zeros(n, dtype=bool)
    if n == 0 or len(purchase_ts) == 0:
        return purchasing, 0, len(purchase_ts)
    named = np.array([c is not None for c in purchase_click], dtype=bool)
    click_code, named_code = _shared_codes(clicks.click_id, purchase_click)
    # Purchases naming a click: look the click up by id.
    order = np.argsort(click_code)
    pos = np.searchsorted(click_code[order], named_code)
    pos = np.minimum(pos, n - 1)
    found_named = named & (click_code[order][pos] == named_code)
    purchasing[order[pos[found_named]]] = True
    # The rest: the user's latest click before the purchase, within the window.
    user_code, buyer_code = _shared_codes(clicks.user_id, purchase_user)
    t0 = float(min(clicks.ts.min(), purchase_ts.min()))
    click_key = _sorted_key(user_code, clicks.ts, t0)
    korder = np.argsort(click_key, kind="stable")
    sorted_key = click_key[korder]
    rest = ~named
    buyer_key = _sorted_key(buyer_code[rest], purchase_ts[rest], t0)
    idx = np.searchsorted(sorted_key, buyer_key, side="right") - 1
    valid = idx >= 0
    idx_c = np.maximum(idx, 0)
    cand = korder[idx_c]
    valid &= user_code[cand] == buyer_code[rest]
    valid &= (purchase_ts[rest] - clicks.ts[cand]) <= window_s
    purchasing[cand[valid]] = True
    attributed = int(found_named.sum() + valid.sum())
    return purchasing, attributed, len(purchase_ts) - attributed


def rfm_scores(
    clicks: ClickColumns,
    purchase_ts: np.ndarray,
    purchase_customer: np.ndarray,
    purchase_amount: np.ndarray,
    policy: RfmPolicy = RfmPolicy(),
) -> np.ndarray:
    """RFM score of each click's customer from purchases strictly before the click."""
    n = len(clicks)
    scores = np.zeros(n)
    customer = clicks.optional["customer_id"]
    has = np.array([c is not None for c in customer], dtype=bool)
    known = np.array([c is not None for c in purchase_customer], dtype=bool)
    if not has.any() or not known.any():
        return scores
    c_code, p_code = _shared_codes(customer[has], purchase_customer[known])
    p_ts = purchase_ts[known]
    p_amount = purchase_amount[known]
    t0 = float(min(clicks.ts.min(), p_ts.min()))
    p_key = _sorted_key(p_code, p_ts, t0)
    order = np.argsort(p_key, kind="stable")
    p_key, p_ts, p_amount, p_code = p_key[order], p_ts[order], p_amount[order], p_code[order]
    money = np.r_[0.0, np.cumsum(p_amount)]
    c_ts = clicks.ts[has]
    # Purchases strictly before the click: [first in lookback, last before click].
    end = np.searchsorted(p_key, _sorted_key(c_code, c_ts, t0), side="left")
    start = np.searchsorted(
        p_key, _sorted_key(c_code, c_ts - policy.lookback_days * DAY_S, t0), side="left"
    )
    count = end - start
    last = np.maximum(end - 1, 0)
    has_last = (end > 0) & (p_code[last] == c_code)
    recency_days = np.where(has_last, (c_ts - p_ts[last]) / DAY_S, np.inf)
    scores[has] = rfm_formula(recency_days, count, money[end] - money[start], policy)
    return scores


def rfm_formula(
    recency_days: np.ndarray | float,
    count: np.ndarray | float,
    amount: np.ndarray | float,
    policy: RfmPolicy = RfmPolicy(),
) -> np.ndarray:
    """The RFM score from recency (days), purchase count and amount (arrays or scalars)."""
    r = np.clip(
        (policy.stale_days - recency_days) / (policy.stale_days - policy.recent_days), 0.0, 1.0
    )
    f = np.minimum(count / policy.frequent_purchases, 1.0)
    m = np.minimum(amount / policy.valuable_amount, 1.0)
    return (r + f + m) / 3.0


def rfm_snapshot(
    purchases: Purchases, at: float, policy: RfmPolicy = RfmPolicy()
) -> dict[str, np.ndarray]:
    """Per customer, purchases in the lookback before ``at``: last time, count, amount.

    Written next to each model version for the stream worker's RFM cache.
    """
    known = np.array([c is not None for c in purchases.customer_id], dtype=bool)
    window = known & (purchases.ts < at) & (purchases.ts >= at - policy.lookback_days * DAY_S)
    customers = purchases.customer_id[window].astype(str)
    uniq, inverse = np.unique(customers, return_inverse=True)
    last = np.full(len(uniq), -np.inf)
    np.maximum.at(last, inverse, purchases.ts[window])
    return {
        "customer_id": uniq,
        "last_ts": last,
        "count": np.bincount(inverse, minlength=len(uniq)).astype(np.int64),
        "amount": np.bincount(inverse, weights=purchases.amount[window], minlength=len(uniq)),
    }


def make_labels(
    clicks: ClickColumns, purchases: Purchases, policy: RfmPolicy = RfmPolicy()
) -> Labels:
    """Weak labels for every click of a data set."""
    purchasing, attributed, unattributed = attribute_purchases(
        clicks, purchases.ts, purchases.user_id, purchases.click_id
    )
    rfm = rfm_scores(clicks, purchases.ts, purchases.customer_id, purchases.amount, policy)
    high = rfm >= policy.high_score
    return Labels(purchasing, rfm, high, purchasing | high, attributed, unattributed)


def balancing_weights(ts: np.ndarray, logged_in: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Sample weights giving every (hour of day, day of week, logged-in, label) cell the
    same total weight; mean weight 1. Cells without clicks are simply absent."""
    hour = np.floor_divide(np.mod(ts, DAY_S), 3600).astype(np.int64)
    dow = np.mod(np.floor_divide(ts, DAY_S).astype(np.int64) + 3, 7)
    cell = ((hour * 7 + dow) * 2 + logged_in.astype(np.int64)) * 2 + (label > 0.5)
    _, inverse, counts = np.unique(cell, return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return weights * (len(ts) / weights.sum())


def propensity_weights(
    cells: Sequence[np.ndarray],
    label: np.ndarray,
    min_labels: int = 30,
    human_share: float = 0.5,
) -> tuple[np.ndarray, dict[str, int]]:
    """Sample weights under which the human label is independent of the propensity cell.

    Weak labels are selected by who can be labelled: a logged-out visitor or a guest in
    the app rarely buys, so "has a human label" depends on attributes that say nothing
    of being a robot. Within each cell (the combination of the arrays in ``cells``, e.g.
    device, logged-in status and hour of day) the clicks labelled human get
    ``human_share`` of the cell's total weight and the others the rest (1/2: equal
    totals), and every cell keeps its share of the clicks: the weighted label rate is
    then the same in every cell, so a model gains nothing by learning which cell a click
    is in. SLIDR's balancing (every cell the same total) does this too but also blows a
    cell of 3 labels up to the weight of a cell of 30,000.

    The clicks of cells with fewer than ``min_labels`` human labels (or non-human ones)
    are pooled with the other such clicks of their coarser cell (the leading arrays of
    ``cells``) and balanced there, level by level, down to all the clicks left. Returns
    the weights (mean 1) and how many clicks were balanced at each level (``cells: k``
    for the k leading arrays).
    """
    human = np.asarray(label) < 0.5  # label is the training target: 1 = not human
    n = len(human)
    weights = np.zeros(n, dtype=np.float64)
    assigned = np.zeros(n, dtype=bool)
    levels: dict[str, int] = {}
    for depth in range(len(cells), -1, -1):
        code = cell_codes(cells[:depth], n)
        rest = ~assigned
        size = np.bincount(code[rest], minlength=code.max() + 1).astype(np.float64)
        humans = np.bincount(
            code[rest], weights=human[rest].astype(np.float64), minlength=code.max() + 1
        )
        others = size - humans
        enough = (
            (humans >= min_labels) & (others >= min_labels) if depth else np.ones_like(size, bool)
        )
        take = rest & enough[code]
        if not take.any():
            continue
        c = code[take]
        weights[take] = np.where(
            human[take],
            size[c] * human_share / np.maximum(humans[c], 1),
            size[c] * (1.0 - human_share) / np.maximum(others[c], 1),
        )
        assigned |= take
        levels[f"cells: {depth}"] = int(take.sum())
    return weights * (n / max(weights.sum(), 1e-12)), levels


def cell_codes(cells: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Per click (``n`` of them), an integer 0..k-1 naming its combination of the values
    of the arrays in ``cells`` (all zero when none is given)."""
    if not len(cells):
        return np.zeros(n, dtype=np.int64)
    _, code = np.unique(
        np.stack([np.unique(c, return_inverse=True)[1] for c in cells]),
        axis=1,
        return_inverse=True,
    )
    return np.asarray(code).reshape(-1)


def human_weight_concentration(weights: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """How few clicks the labelled humans' weight rests on: their number, their effective
    number under the weights (Kish: (sum w)^2 / sum w^2), the largest weight (mean weight
    1) and the share of the human weight on the heaviest 1% of them.

    Why: balancing within propensity cells gives each human label of a label-poor cell the
    weight of hundreds of clicks. On ``slidr simulate --world proxy_lies --seed 2`` (5 days
    of 40k clicks) 116 signed-out buyers, each worth 560-790 clicks, held 81% of the human
    weight; the 11,118 labelled humans of the four fit days counted as 144. A fit turns on
    those few clicks, which is one reason the tail of the scores varies with a network's
    initial weights.
    """
    human = np.asarray(label) < 0.5
    w = np.asarray(weights, dtype=np.float64)[human]
    if not len(w) or w.sum() <= 0:
        return {"labelled": len(w), "effective": 0.0, "max_weight": 0.0, "top_1pct_share": 0.0}
    heaviest = np.sort(w)[::-1][: max(1, int(np.ceil(0.01 * len(w))))]
    return {
        "labelled": len(w),
        "effective": float(w.sum() ** 2 / np.square(w).sum()),
        "max_weight": float(w.max()),
        "top_1pct_share": float(heaviest.sum() / w.sum()),
    }


def human_weight_text(concentration: dict[str, float]) -> str:
    """One sentence on ``human_weight_concentration``'s figures (training's progress and
    the report say the same)."""
    return (
        f"{int(concentration['labelled']):,} labelled humans count as "
        f"{concentration['effective']:,.0f} under the weights; the heaviest weighs "
        f"{concentration['max_weight']:,.0f} clicks and the heaviest 1% hold "
        f"{concentration['top_1pct_share']:.0%} of the human weight"
    )
