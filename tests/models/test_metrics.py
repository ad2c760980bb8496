"""SPEC §3 metrics on hand-made arrays with known answers, and threshold sweeps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.metrics import (
    HOUR_S,
    auc,
    bootstrap_aucs,
    compute_metrics,
    curve,
    ivr_at_fpr,
    percentile_interval,
    recall_at_human_fpr,
    recall_by_kind,
    robotic_sessions,
    split_slices,
    threshold_for_fpr,
    weighted_auc,
)

# --------------------------------------------------------------------------------------
# robotic_sessions
# --------------------------------------------------------------------------------------


def _sessions() -> tuple[np.ndarray, np.ndarray]:
    # a: 11 clicks in clock hour 0 and one more hours later -> robotic, all 12 clicks.
    # b: exactly 10 clicks in hour 0 -> not robotic (needs more than k).
    # c: 12 clicks straddling 01:00, 6 in each clock hour -> not robotic.
    a = [10.0 * i for i in range(11)] + [5.0 * HOUR_S]
    b = [10.0 * i for i in range(10)]
    c = [HOUR_S - 60.0 + 10.0 * i for i in range(12)]
    ids = np.array(["a"] * len(a) + ["b"] * len(b) + ["c"] * len(c), dtype=object)
    ts = np.array(a + b + c)
    return ids, ts


def test_robotic_sessions_flags_every_click_of_a_session_over_k_in_one_clock_hour():
    ids, ts = _sessions()
    flagged = robotic_sessions(ids, ts, k=10)
    assert flagged.dtype == bool
    np.testing.assert_array_equal(flagged, ids == "a")


def test_robotic_sessions_does_not_depend_on_click_order():
    ids, ts = _sessions()
    perm = np.random.default_rng(3).permutation(ids.size)
    np.testing.assert_array_equal(robotic_sessions(ids[perm], ts[perm]), (ids == "a")[perm])


def test_robotic_sessions_k_is_a_parameter():
    ids, ts = _sessions()
    # With k = 5 every session has a clock hour holding more than 5 clicks.
    assert robotic_sessions(ids, ts, k=5).all()
    assert not robotic_sessions(ids, ts, k=11).any()


def test_robotic_sessions_on_no_clicks():
    assert robotic_sessions(np.array([], dtype=object), np.array([])).shape == (0,)


# --------------------------------------------------------------------------------------
# compute_metrics
# --------------------------------------------------------------------------------------

SLICES = np.array(["a", "a", "a", "a", "b", "b"], dtype=object)
INVALID = np.array([1, 0, 1, 0, 0, 0], dtype=bool)
PURCHASING = np.array([1, 1, 0, 0, 0, 0], dtype=bool)
ROBOTIC = np.array([0, 0, 1, 1, 0, 0], dtype=bool)
IS_BOT = np.array([0, 0, 1, 1, 0, 1], dtype=bool)


def test_compute_metrics_overall_and_per_slice():
    m = compute_metrics(INVALID, PURCHASING, ROBOTIC, SLICES, IS_BOT)
    o = m["overall"]
    assert (o["clicks"], o["invalid_clicks"], o["purchasing_clicks"], o["robotic_clicks"]) == (
        6,
        2,
        2,
        2,
    )
    assert o["ivr"] == pytest.approx(2 / 6)
    assert o["fpr"] == pytest.approx(1 / 2)
    assert o["coverage"] == pytest.approx(1 / 2)
    assert o["bot_recall"] == pytest.approx(1 / 3)
    assert o["human_fpr"] == pytest.approx(1 / 3)
    assert o["precision"] == pytest.approx(1 / 2)

    assert set(m["slices"]) == {"a", "b"}
    a = m["slices"]["a"]
    assert (a["clicks"], a["ivr"], a["fpr"], a["coverage"]) == (4, 0.5, 0.5, 0.5)
    assert (a["bot_recall"], a["human_fpr"], a["precision"]) == (0.5, 0.5, 0.5)


def test_compute_metrics_undefined_ratios_are_none():
    b = compute_metrics(INVALID, PURCHASING, ROBOTIC, SLICES, IS_BOT)["slices"]["b"]
    assert b["clicks"] == 2 and b["ivr"] == 0.0
    assert b["fpr"] is None  # no purchasing clicks
    assert b["coverage"] is None  # no robotic clicks
    assert b["precision"] is None  # nothing invalidated
    assert b["bot_recall"] == 0.0 and b["human_fpr"] == 0.0


def test_compute_metrics_is_plain_json():
    m = compute_metrics(INVALID, PURCHASING, ROBOTIC, SLICES, IS_BOT)
    assert json.loads(json.dumps(m, allow_nan=False)) == m


def test_compute_metrics_without_truth_or_slices():
    m = compute_metrics(INVALID, PURCHASING, ROBOTIC, None)
    assert m["slices"] == {}
    assert "bot_recall" not in m["overall"]
    assert m["overall"]["ivr"] == pytest.approx(2 / 6)


def test_compute_metrics_on_no_clicks():
    empty = np.zeros(0, dtype=bool)
    m = compute_metrics(empty, empty, empty, np.array([], dtype=object))
    assert m["overall"]["clicks"] == 0 and m["overall"]["ivr"] is None
    assert m["slices"] == {}


def test_split_slices_is_sorted_and_inverts():
    names, codes = split_slices(np.array(["m", "d", "m", None], dtype=object))
    assert names.tolist() == ["None", "d", "m"]
    assert names[codes].tolist() == ["m", "d", "m", "None"]


# --------------------------------------------------------------------------------------
# curve and thresholds
# --------------------------------------------------------------------------------------


def _random_clicks(n: int = 3000, seed: int = 7):
    rng = np.random.default_rng(seed)
    bot = rng.random(n) < 0.4
    # Rounded to make ties common: threshold logic must not split them.
    scores = np.round(np.where(bot, rng.beta(5, 2, n), rng.beta(2, 5, n)), 2)
    purchasing = ~bot & (rng.random(n) < 0.3)
    robotic = bot & (rng.random(n) < 0.5)
    return scores, purchasing, robotic, bot


def test_curve_is_monotone_and_spans_nothing_to_everything():
    scores, purchasing, robotic, bot = _random_clicks()
    c = curve(scores, purchasing, robotic, bot)
    assert len(c) == np.unique(scores).size + 1
    for arr in (c.fpr, c.ivr, c.coverage, c.bot_recall, c.human_fpr):
        assert (np.diff(arr) >= 0).all()
    assert (np.diff(c.threshold) < 0).all()
    assert c.ivr[0] == 0 and c.fpr[0] == 0
    assert c.ivr[-1] == 1 and c.fpr[-1] == 1 and c.coverage[-1] == 1
    assert c.n == scores.size and c.p == purchasing.sum() and c.r == robotic.sum()


def test_curve_matches_direct_counts_on_a_grid():
    scores, purchasing, robotic, bot = _random_clicks()
    grid = np.array([0.9, 0.1, 0.5, 0.5, 0.33])
    c = curve(scores, purchasing, robotic, bot, grid=grid)
    np.testing.assert_array_equal(c.threshold, [0.9, 0.5, 0.33, 0.1])
    for i, t in enumerate(c.threshold):
        inv = scores >= t
        assert c.ivr[i] == pytest.approx(inv.mean())
        assert c.fpr[i] == pytest.approx(inv[purchasing].mean())
        assert c.coverage[i] == pytest.approx(inv[robotic].mean())
        assert c.bot_recall[i] == pytest.approx(inv[bot].mean())
        assert c.human_fpr[i] == pytest.approx(inv[~bot].mean())
        assert c.precision[i] == pytest.approx(bot[inv].mean())


def test_curve_ratios_without_denominator_are_nan_and_to_dict_is_json():
    c = curve([0.2, 0.8], [False, False], [False, True])
    assert np.isnan(c.fpr).all()
    d = c.to_dict()
    assert d["fpr"] == [None, None, None]
    json.dumps(d, allow_nan=False)


@pytest.mark.parametrize("f", [0.0, 0.01, 0.05, 0.1, 0.37, 0.999])
def test_threshold_for_fpr_keeps_fpr_within_f_and_is_the_smallest(f):
    scores, purchasing, _, _ = _random_clicks()
    t = threshold_for_fpr(scores, purchasing, f)
    assert np.mean(scores[purchasing] >= t) <= f
    # The next float down already invalidates one more purchasing click.
    assert np.mean(scores[purchasing] >= np.nextafter(t, -np.inf)) > f


def test_threshold_for_fpr_never_splits_a_tie():
    scores = np.array([0.5, 0.5, 0.5, 0.5, 0.9])
    purchasing = np.array([True, True, True, True, False])
    t = threshold_for_fpr(scores, purchasing, 0.5)
    invalid = scores >= t
    assert invalid.tolist() == [False, False, False, False, True]


def test_threshold_for_fpr_at_one_invalidates_everything():
    scores, purchasing, _, _ = _random_clicks()
    assert (scores >= threshold_for_fpr(scores, purchasing, 1.0)).all()


def test_threshold_for_fpr_needs_purchasing_clicks():
    with pytest.raises(ValueError, match="purchasing"):
        threshold_for_fpr([0.1, 0.2], [False, False], 0.1)


def test_ivr_at_fpr_on_a_hand_made_example():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.35])
    purchasing = np.array([1, 1, 1, 1, 0, 0, 0], dtype=bool)
    # One purchasing click of four may go: everything above 0.3 is invalidated.
    assert ivr_at_fpr(scores, purchasing, 0.25) == pytest.approx(4 / 7)
    assert ivr_at_fpr(scores, purchasing, 0.0) == pytest.approx(2 / 7)


def test_recall_at_human_fpr():
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    is_bot = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    assert recall_at_human_fpr(scores, is_bot, 0.0) == 1.0
    # Overlapping: one human above two of the bots; no human may be invalidated.
    scores = np.array([0.1, 0.2, 0.75, 0.6, 0.7, 0.8])
    assert recall_at_human_fpr(scores, is_bot, 0.0) == pytest.approx(1 / 3)
    assert recall_at_human_fpr(scores, np.zeros(6, dtype=bool)) is None


def test_recall_by_kind_uses_one_threshold_for_every_kind():
    # Humans score 0..0.9: at 10% human FPR the threshold sits above 0.8.
    humans = np.arange(10) / 10
    bots = np.array([0.95, 0.99, 0.5, 0.1, 0.92])
    kinds = np.array(["", "", "", "", "", "", "", "", "", "", "fast", "fast", "slow", "slow", "x"])
    scores = np.concatenate([humans, bots])
    is_bot = np.arange(15) >= 10
    out = recall_by_kind(scores, is_bot, kinds, 0.1)
    assert out == {
        "fast": {"bots": 2, "recall": 1.0},
        "slow": {"bots": 2, "recall": 0.0},
        "x": {"bots": 1, "recall": 1.0},
    }
    overall = recall_at_human_fpr(scores, is_bot, 0.1)
    assert overall == pytest.approx(3 / 5)
    assert recall_by_kind(scores, np.zeros(15, dtype=bool), kinds) == {}


def test_weighted_auc_counts_each_click_its_weight_and_ties_one_half() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 12, 400).astype(float)  # many ties
    positive = rng.random(400) < 0.3
    weights = rng.integers(1, 5, 400)
    # The same as the plain AUC of the data with each click repeated weight times.
    repeated = weighted_auc(
        np.repeat(scores, weights), np.repeat(positive, weights), np.ones(weights.sum())
    )
    assert weighted_auc(scores, positive, weights) == pytest.approx(repeated)
    assert weighted_auc([0.1, 0.9], [False, True], [1.0, 1.0]) == 1.0
    assert weighted_auc([0.5, 0.5], [False, True], [1.0, 3.0]) == 0.5
    # One heavy negative above the positive, three light ones below it.
    assert weighted_auc([0.9, 0.1, 0.2, 0.3, 0.5], [0, 0, 0, 0, 1], [3, 1, 1, 1, 1]) == 0.5
    assert weighted_auc([0.1, 0.2], [True, True], [1.0, 1.0]) is None


# --------------------------------------------------------------------------------------
# Bootstrap intervals of AUCs
# --------------------------------------------------------------------------------------


def _ranked(seed: int, n: int = 4_000, positives: int = 60, signal: float = 2.0):
    rng = np.random.default_rng(seed)
    positive = np.zeros(n, dtype=bool)
    positive[rng.choice(n, positives, replace=False)] = True
    return rng.normal(size=n) + signal * positive, positive


def test_bootstrap_aucs_bracket_the_auc_and_pair_the_models() -> None:
    strong, positive = _ranked(1)
    noise = np.random.default_rng(2).normal(size=positive.size)
    drawn = bootstrap_aucs({"strong": strong, "same": strong.copy(), "noise": noise}, positive)
    whole = auc(strong, positive)
    lo, hi = percentile_interval(drawn["strong"])
    assert lo < whole < hi and hi - lo < 0.1
    assert abs(float(np.mean(drawn["strong"])) - whole) < 0.01
    # The same resamples for every model: a model against its copy differs by nothing.
    assert np.array_equal(drawn["strong"], drawn["same"])
    # A model with signal against noise: the paired difference stays well above 0.
    assert percentile_interval(drawn["strong"] - drawn["noise"])[0] > 0.2
    noise_lo, noise_hi = percentile_interval(drawn["noise"])
    assert noise_lo < 0.5 < noise_hi


def test_bootstrap_intervals_narrow_with_more_positives() -> None:
    widths = []
    for positives in (30, 600):
        scores, positive = _ranked(3, n=20_000, positives=positives, signal=1.0)
        lo, hi = percentile_interval(bootstrap_aucs({"m": scores}, positive, rounds=500)["m"])
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.5  # about sqrt(20) narrower


def test_bootstrap_aucs_refuse_one_class_and_misshapen_scores() -> None:
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_aucs({"m": np.arange(4.0)}, np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match="m: 3 scores for 4 clicks"):
        bootstrap_aucs({"m": np.arange(3.0)}, np.array([True, False, False, True]))
    with pytest.raises(ValueError, match="m: scores must be finite"):
        bootstrap_aucs({"m": np.array([0.1, np.nan, 0.3])}, np.array([True, False, True]))
    with pytest.raises(ValueError, match="level"):
        percentile_interval([0.5, 0.6], level=95)
