"""Weak labels (SPEC §4): purchase attribution, RFM from past purchases only, balancing weights."""

from __future__ import annotations

import numpy as np
import pytest

from data.dataset import Purchases, clicks_from_rows
from events.schemas import parse_click
from models.labels import (
    ATTRIBUTION_WINDOW_S,
    RfmPolicy,
    attribute_purchases,
    balancing_weights,
    human_weight_concentration,
    make_labels,
    propensity_weights,
    rfm_scores,
)

T0 = 1_793_577_600.0  # 2026-11-02 00:00 UTC, a Monday
HOUR = 3600.0
DAY = 86_400.0


def clicks(*specs: tuple[str, float, str] | tuple[str, float, str, str]):
    """ClickColumns from (click_id, ts, user_id[, customer_id]) tuples."""
    rows = []
    for spec in specs:
        click = {"click_id": spec[0], "ts": spec[1], "user_id": spec[2], "ip": "10.0.0.1"}
        if len(spec) > 3:
            click.update(customer_id=spec[3], logged_in=True)
        rows.append(parse_click(click))
    return clicks_from_rows(rows)


def purchases(*specs: dict) -> Purchases:
    """Purchases from dicts with ts and user_id, optionally click_id, customer_id, amount."""
    specs = sorted(specs, key=lambda p: p["ts"])
    return Purchases(
        purchase_id=np.array([f"p{i}" for i in range(len(specs))], dtype=object),
        ts=np.array([p["ts"] for p in specs], dtype=np.float64),
        user_id=np.array([p["user_id"] for p in specs], dtype=object),
        customer_id=np.array([p.get("customer_id") for p in specs], dtype=object),
        click_id=np.array([p.get("click_id") for p in specs], dtype=object),
        amount=np.array([p.get("amount", 0.0) for p in specs], dtype=np.float64),
    )


def attribute(cols, bought: Purchases):
    return attribute_purchases(cols, bought.ts, bought.user_id, bought.click_id)


def marked(cols, flags: np.ndarray) -> set[str]:
    return set(cols.click_id[flags])


# --- attribution ---------------------------------------------------------------------


def test_purchase_naming_a_click_marks_that_click() -> None:
    cols = clicks(("a", T0, "u1"), ("b", T0 + HOUR, "u1"), ("c", T0 + 2 * HOUR, "u2"))
    # Bought after the user's later click "b", but naming "a": "a" is the purchasing click.
    flags, attributed, unattributed = attribute(
        cols, purchases({"ts": T0 + 3 * HOUR, "user_id": "u1", "click_id": "a"})
    )
    assert marked(cols, flags) == {"a"}
    assert (attributed, unattributed) == (1, 0)


def test_purchase_without_click_marks_the_users_latest_click_before_it() -> None:
    cols = clicks(
        ("a", T0, "u1"),
        ("b", T0 + HOUR, "u1"),
        ("other", T0 + 2 * HOUR, "u2"),  # later, but another user
        ("after", T0 + 5 * HOUR, "u1"),  # same user, but after the purchase
    )
    flags, attributed, unattributed = attribute(
        cols, purchases({"ts": T0 + 3 * HOUR, "user_id": "u1"})
    )
    assert marked(cols, flags) == {"b"}
    assert (attributed, unattributed) == (1, 0)


def test_purchase_within_24_hours_is_attributed_and_25_hours_later_is_not() -> None:
    cols = clicks(("a", T0, "u1"), ("z", T0, "u2"))
    flags, attributed, unattributed = attribute(
        cols,
        purchases(
            {"ts": T0 + ATTRIBUTION_WINDOW_S - 60, "user_id": "u1"},
            {"ts": T0 + 25 * HOUR, "user_id": "u2"},
        ),
    )
    assert marked(cols, flags) == {"a"}
    assert (attributed, unattributed) == (1, 1)


def test_purchase_25_hours_after_the_click_marks_nothing() -> None:
    cols = clicks(("a", T0, "u1"), ("b", T0 + HOUR, "u2"))
    flags, attributed, unattributed = attribute(
        cols, purchases({"ts": T0 + 25 * HOUR, "user_id": "u1"})
    )
    assert not flags.any()
    assert (attributed, unattributed) == (0, 1)


def test_purchase_naming_an_unknown_click_is_unattributed() -> None:
    cols = clicks(("a", T0, "u1"))
    flags, attributed, unattributed = attribute(
        cols, purchases({"ts": T0 + HOUR, "user_id": "u1", "click_id": "not-in-data"})
    )
    assert not flags.any()
    assert (attributed, unattributed) == (0, 1)


# --- RFM -----------------------------------------------------------------------------


def test_rfm_uses_only_purchases_strictly_before_the_click() -> None:
    cols = clicks(("early", T0, "u1", "cust"), ("late", T0 + 10 * DAY, "u1", "cust"))
    history = [
        {"ts": T0 - d * DAY, "user_id": "u1", "customer_id": "cust", "amount": 80.0}
        for d in (3, 20, 50)
    ]
    before = rfm_scores(cols, *_rfm_args(purchases(*history)))
    between = {"ts": T0 + DAY, "user_id": "u1", "customer_id": "cust", "amount": 500.0}
    at_click = {"ts": T0, "user_id": "u1", "customer_id": "cust", "amount": 500.0}
    after = rfm_scores(cols, *_rfm_args(purchases(*history, between, at_click)))
    assert before[0] > 0
    # A purchase after the click, or at the same instant, does not raise its score ...
    assert after[0] == pytest.approx(before[0])
    # ... while the later click does see them.
    assert after[1] > before[1]


def test_rfm_score_components() -> None:
    policy = RfmPolicy()
    cols = clicks(("no-customer", T0, "u0"), ("new", T0, "u1", "c1"), ("loyal", T0, "u2", "c2"))
    bought = purchases(
        *[
            {"ts": T0 - (1 + d) * DAY, "user_id": "u2", "customer_id": "c2", "amount": 100.0}
            for d in range(int(policy.frequent_purchases))
        ]
    )
    scores = rfm_scores(cols, *_rfm_args(bought), policy)
    # No customer or no history: 0. Recent, frequent and valuable: 1.
    np.testing.assert_allclose(scores, [0.0, 0.0, 1.0])


def _rfm_args(bought: Purchases):
    return bought.ts, bought.customer_id, bought.amount


def test_make_labels_human_is_purchasing_or_high_rfm() -> None:
    cols = clicks(("buyer", T0, "u1"), ("loyal", T0, "u2", "c2"), ("nobody", T0, "u3"))
    bought = purchases(
        {"ts": T0 + HOUR, "user_id": "u1"},
        *[
            {"ts": T0 - (1 + d) * DAY, "user_id": "u2", "customer_id": "c2", "amount": 100.0}
            for d in range(6)
        ],
    )
    labels = make_labels(cols, bought)
    assert list(labels.purchasing) == [True, False, False]
    assert list(labels.high_rfm) == [False, True, False]
    assert list(labels.human) == [True, True, False]
    assert list(labels.robot) == [0.0, 0.0, 1.0]
    assert labels.summary()["human_labelled"] == 2


# --- balancing weights ---------------------------------------------------------------


def test_balancing_weights_equalise_cells_and_average_one() -> None:
    rng = np.random.default_rng(3)
    n = 40_000
    # Uneven traffic: more at day, more logged out, few positives at night.
    ts = np.sort(T0 + rng.uniform(0, 14 * DAY, n))
    logged_in = rng.random(n) < 0.25
    hour = (ts % DAY) // HOUR
    label = (rng.random(n) < np.where(hour < 6, 0.8, 0.3)).astype(np.float32)
    weights = balancing_weights(ts, logged_in, label)

    assert weights.shape == (n,)
    assert weights.mean() == pytest.approx(1.0)
    dow = ((ts // DAY).astype(int) + 3) % 7
    cells: dict[tuple, float] = {}
    for key, w in zip(
        zip(hour.astype(int), dow, logged_in, label > 0.5, strict=True), weights, strict=True
    ):
        cells[key] = cells.get(key, 0.0) + w
    totals = np.array(list(cells.values()))
    assert len(totals) == 24 * 7 * 2 * 2  # every cell is populated here
    np.testing.assert_allclose(totals, totals[0], rtol=1e-9)


def test_balancing_weights_day_of_week_is_utc_monday_zero() -> None:
    # Two clicks, same hour, same login, same label, a week apart: one cell, equal weights.
    # A Monday and a Tuesday at the same hour: two cells.
    ts = np.array([T0 + 10 * HOUR, T0 + 7 * DAY + 10 * HOUR, T0 + DAY + 10 * HOUR])
    w = balancing_weights(ts, np.zeros(3, bool), np.zeros(3))
    np.testing.assert_allclose(w[0] + w[1], w[2])
    assert w.mean() == pytest.approx(1.0)


# --- propensity weights ----------------------------------------------------------------


def test_propensity_weights_make_the_label_independent_of_the_cell() -> None:
    """Signed-in visitors are labelled human 30x as often as signed-out ones; under the
    weights both labels weigh half of every cell, and each cell keeps its share."""
    rng = np.random.default_rng(4)
    n = 60_000
    logged_in = rng.random(n) < 0.3
    device = rng.integers(0, 3, n)
    human = rng.random(n) < np.where(logged_in, 0.3, 0.01)
    label = (~human).astype(np.float32)
    weights, levels = propensity_weights([logged_in, device], label)

    assert weights.mean() == pytest.approx(1.0)
    assert levels == {"cells: 2": n}  # every cell has 30 labels of each kind
    for li in (False, True):
        for d in range(3):
            cell = (logged_in == li) & (device == d)
            assert weights[cell & human].sum() == pytest.approx(weights[cell].sum() / 2)
            assert weights[cell].sum() == pytest.approx(cell.sum())


def test_propensity_weights_pool_label_poor_cells_with_coarser_ones() -> None:
    rng = np.random.default_rng(5)
    n = 40_000
    logged_in = rng.random(n) < 0.5
    device = rng.integers(0, 4, n)
    # Signed out, devices 0 and 1 have ~20 human labels each and device 3 none: too few
    # alone, enough pooled in their signed-out cell (level 1).
    rate = np.where(logged_in, 0.2, np.choose(device, [0.004, 0.004, 0.05, 0.0]))
    human = rng.random(n) < rate
    weights, levels = propensity_weights(
        [logged_in, device], (~human).astype(np.float32), min_labels=30
    )
    out = ~logged_in
    pooled = out & (device != 2)
    assert levels == {
        "cells: 2": int((logged_in | (device == 2)).sum()),
        "cells: 1": int(pooled.sum()),
    }
    assert weights[pooled & human].sum() == pytest.approx(weights[pooled].sum() / 2)
    assert np.isfinite(weights).all() and (weights > 0).all()


def test_propensity_weights_give_humans_the_asked_share_of_every_cell() -> None:
    rng = np.random.default_rng(6)
    n = 30_000
    logged_in = rng.random(n) < 0.4
    human = rng.random(n) < np.where(logged_in, 0.2, 0.02)
    weights, _ = propensity_weights([logged_in], (~human).astype(np.float32), human_share=0.1)
    for li in (False, True):
        cell = logged_in == li
        assert weights[cell & human].sum() == pytest.approx(0.1 * weights[cell].sum())


def test_human_weight_concentration_counts_how_few_labels_carry_the_weight() -> None:
    robot = np.array([0.0] * 100 + [1.0] * 900)
    even = human_weight_concentration(np.ones(1000), robot)
    assert even["labelled"] == 100
    assert even["effective"] == pytest.approx(100)
    assert even["top_1pct_share"] == pytest.approx(0.01)
    weights = np.ones(1000)
    weights[0] = 99.0  # one label weighs as much as the other 99 together
    heavy = human_weight_concentration(weights, robot)
    assert heavy["effective"] == pytest.approx(198**2 / (99**2 + 99))
    assert heavy["max_weight"] == 99.0
    assert heavy["top_1pct_share"] == pytest.approx(0.5)
    assert human_weight_concentration(np.ones(3), np.ones(3))["labelled"] == 0
