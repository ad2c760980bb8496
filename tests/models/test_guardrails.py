"""Guardrails: the data checks' label-density hole, and each model check on synthetic
held-out days (the new version against the active one on the same clicks)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from features.windows import DAY_S
from models.guardrails import (
    GuardrailConfig,
    HeldOut,
    ModelGuardrailConfig,
    check_model,
    check_training_data,
    label_share_by_slice,
    population_stability_index,
    slice_label_share,
)

SLICES = ("desktop/logged_out", "mobile/logged_in")
BUDGET = 0.02


# -- data guardrails: purchase labels missing a few hours a day -----------------------------


def _traffic(
    days: int = 3, per_day: int = 20_000, hole: tuple[int, int] | None = None, seed: int = 1
):
    """A prepared-like object: clicks over ``days``, purchases 0-6 h after 2 % of them;
    purchases whose time falls in ``hole`` hours of the day are lost."""
    rng = np.random.default_rng(seed)
    t0 = 20_759 * DAY_S
    ts = np.sort(t0 + rng.random(days * per_day) * days * DAY_S)
    bought = rng.random(len(ts)) < 0.02
    purchase_ts = ts[bought] + rng.exponential(5_000, bought.sum())
    if hole is not None:
        hour = (purchase_ts % DAY_S) // 3600
        lost = (hour >= hole[0]) & (hour < hole[1])
        purchase_ts = purchase_ts[~lost]
        bought[np.nonzero(bought)[0][lost]] = False  # their clicks lose the label too
    n = len(ts)
    labels = SimpleNamespace(purchasing=bought, human=bought | (rng.random(n) < 0.08))
    prepared = SimpleNamespace(
        data=SimpleNamespace(
            clicks=SimpleNamespace(ts=ts), purchases=SimpleNamespace(ts=np.sort(purchase_ts))
        ),
        labels=labels,
        slices=np.array([SLICES[i % 2] for i in range(n)]),
        features=np.zeros((n, 2), dtype=np.float32),
    )
    day = np.floor_divide(ts, DAY_S)
    split = SimpleNamespace(
        train=np.nonzero(day < day.max() - 1)[0], validation=np.nonzero(day == day.max() - 1)[0]
    )
    return prepared, split


def _result(report, name: str):
    (found,) = [r for r in report.results if r.name == name]
    return found


def test_purchases_missing_three_hours_a_day_fail_purchase_label_density() -> None:
    prepared, split = _traffic(hole=(9, 12))
    report = check_training_data(prepared, split)
    density = _result(report, "purchase_label_density")
    assert not density.passed
    assert "09:00-12:00 UTC daily" in density.detail
    assert report.failed_names() == ["purchase_label_density"]


def test_complete_purchases_pass_every_data_guardrail() -> None:
    prepared, split = _traffic()
    report = check_training_data(prepared, split)
    assert report.passed, report.to_dict()


# -- model guardrails ---------------------------------------------------------------------


def _held_out(seed: int = 2, n: int = 40_000):
    """Clicks of two slices, 20 % robots; the active version's scores and thresholds set
    at 2 % FPR per slice; the new version's scores = the active ones plus a little noise."""
    rng = np.random.default_rng(seed)
    slices = np.array(SLICES)[rng.integers(0, 2, n)]
    bot = rng.random(n) < np.where(slices == SLICES[0], 0.35, 0.05)
    purchasing = ~bot & (rng.random(n) < 0.05)
    active = np.where(bot, rng.beta(6, 2, n), rng.beta(2, 6, n))
    new = np.clip(active + rng.normal(0, 0.01, n), 0, 1)
    thresholds = {
        s: float(np.quantile(active[(slices == s) & purchasing], 1 - BUDGET)) for s in SLICES
    }
    return slices, purchasing, active, new, thresholds


def _verdicts(scores, slices, thresholds) -> np.ndarray:
    return scores >= np.array([thresholds[s] for s in slices])


def _inputs(new_scores=None, new_invalid=None, seed: int = 2, targets: dict | None = None):
    slices, purchasing, active, new, thresholds = _held_out(seed)
    new = new if new_scores is None else new_scores(new, slices)
    invalid = (
        _verdicts(new, slices, thresholds)
        if new_invalid is None
        else new_invalid(new, slices, purchasing, thresholds)
    )
    result = {
        "calibration": {
            "budget": BUDGET,
            "slices": [
                {"name": s, "calibrated": True, "fpr_target": (targets or {}).get(s, BUDGET)}
                for s in SLICES
            ],
        }
    }
    manifest = {
        "version": "v0001",
        "calibration": {"thresholds": thresholds, "default_threshold": 0.5},
    }
    held = HeldOut(np.zeros((len(new), 1), np.float32), slices, purchasing, new, invalid)
    return result, manifest, held, active


def test_a_model_like_the_active_one_passes_every_model_guardrail() -> None:
    result, manifest, held, active = _inputs()
    report = check_model(result, manifest, held, active)
    names = [r.name for r in report.results]
    assert names == [
        "heldout_ivr_ratio",
        "heldout_fpr",
        "slice_fpr_budget",
        "slice_ivr_jump",
        "score_psi",
    ]
    assert report.passed, report.to_dict()
    psi = _result(report, "score_psi")
    assert psi.value < 0.05


def test_ivr_doubling_fails_the_ivr_ratio() -> None:
    result, manifest, held, active = _inputs(
        new_invalid=lambda s, sl, p, th: _verdicts(s, sl, th) | (s > 0.35)
    )
    report = check_model(result, manifest, held, active)
    assert "heldout_ivr_ratio" in report.failed_names()
    ratio = _result(report, "heldout_ivr_ratio").value
    assert ratio > 2.0


def test_fpr_over_its_limit_fails_heldout_fpr_but_not_by_chance() -> None:
    def overshoot(share):
        def invalid(s, sl, p, th):
            rng = np.random.default_rng(5)
            return _verdicts(s, sl, th) | (p & (rng.random(len(s)) < share))

        return invalid

    bad = check_model(*_inputs(new_invalid=overshoot(0.10)))
    assert "heldout_fpr" in bad.failed_names()
    # Slightly above 1.5 x budget on ~1,500 purchasing clicks is not significant.
    result, manifest, held, active = _inputs(new_invalid=overshoot(0.012))
    ok = check_model(result, manifest, held, active)
    fpr = _result(ok, "heldout_fpr")
    assert fpr.passed, fpr


def test_one_slice_over_its_fpr_target_fails_slice_fpr_budget() -> None:
    def invalid(s, sl, p, th):
        rng = np.random.default_rng(6)
        return _verdicts(s, sl, th) | (p & (sl == SLICES[1]) & (rng.random(len(s)) < 0.15))

    report = check_model(*_inputs(new_invalid=invalid))
    failed = _result(report, "slice_fpr_budget")
    assert not failed.passed
    assert SLICES[1] in failed.detail and SLICES[0] not in failed.detail


def test_a_slice_target_of_zero_tolerates_a_few_purchases() -> None:
    result, manifest, held, active = _inputs(targets={SLICES[0]: 0.0, SLICES[1]: 0.0})
    assert _result(check_model(result, manifest, held, active), "slice_fpr_budget").passed


def test_a_slice_ivr_jump_fails_even_when_the_overall_ivr_holds() -> None:
    def invalid(s, sl, p, th):
        verdicts = _verdicts(s, sl, th)
        small = sl == SLICES[1]
        return verdicts | (small & ~p & (s > 0.3))  # non-buyers only: the FPR holds

    report = check_model(*_inputs(new_invalid=invalid))
    assert "slice_ivr_jump" in report.failed_names()
    assert SLICES[1] in _result(report, "slice_ivr_jump").detail
    assert _result(report, "heldout_ivr_ratio").passed


def test_a_shifted_score_distribution_fails_score_psi() -> None:
    report = check_model(*_inputs(new_scores=lambda s, sl: np.clip(s * 0.5 + 0.3, 0, 1)))
    psi = _result(report, "score_psi")
    assert not psi.passed and psi.value > 0.5


def test_without_an_active_version_only_absolute_checks_judge() -> None:
    result, _manifest, held, _active = _inputs(
        new_invalid=lambda s, sl, p, th: _verdicts(s, sl, th) | (~p & (s > 0.3))
    )
    report = check_model(result, None, held, None)
    assert report.passed, report.to_dict()  # IVR up, but nothing to compare with
    assert "no active version" in _result(report, "heldout_ivr_ratio").detail


def test_without_comparable_scores_the_active_manifest_figures_are_used() -> None:
    result, manifest, held, _active = _inputs()
    manifest["metrics"] = {"test": {"overall": {"ivr": 0.02, "fpr": 0.02}, "slices": {}}}
    report = check_model(result, manifest, held, None)
    assert "heldout_ivr_ratio" in report.failed_names()  # ~14 % now vs 2 % promised
    assert "own held-out day" in _result(report, "heldout_ivr_ratio").detail
    assert _result(report, "score_psi").passed and _result(report, "score_psi").value is None


def test_limits_are_configurable() -> None:
    result, manifest, held, active = _inputs()
    strict = ModelGuardrailConfig(max_score_psi=0.0, max_ivr_ratio=0.9)
    failed = check_model(result, manifest, held, active, strict).failed_names()
    assert failed == ["heldout_ivr_ratio", "score_psi"]


@pytest.mark.parametrize("shift, low, high", [(0.0, 0.0, 0.01), (0.2, 0.2, 5.0)])
def test_population_stability_index(shift: float, low: float, high: float) -> None:
    rng = np.random.default_rng(3)
    expected = rng.beta(2, 5, 20_000)
    actual = np.clip(rng.beta(2, 5, 20_000) + shift, 0, 1)
    assert low <= population_stability_index(expected, actual) <= high
    assert population_stability_index(expected, expected) == pytest.approx(0.0, abs=1e-12)


# -- slice label share: against the previous version, never an absolute floor ------------


def _slices_with_labels(shares: dict[str, float], n: int = 10_000, seed: int = 3):
    rng = np.random.default_rng(seed)
    names = np.array(list(shares))[rng.integers(0, len(shares), n)]
    human = rng.random(n) < np.array([shares[s] for s in names])
    return names, human


def test_a_first_training_with_label_poor_slices_is_not_blocked() -> None:
    slices, human = _slices_with_labels(
        {"app/logged_in": 0.3, "app/logged_out": 0.0005, "other/logged_out": 0.0}
    )
    result = slice_label_share(slices, human, None, GuardrailConfig())
    assert result.passed
    assert "other/logged_out" in result.detail and "app/logged_out" in result.detail


def test_a_slice_whose_labels_collapse_against_the_previous_version_fails() -> None:
    before = {
        "label_share_by_slice": label_share_by_slice(*_slices_with_labels({"a": 0.2, "b": 0.01})),
        "version": "v0007",
    }
    same = slice_label_share(
        *_slices_with_labels({"a": 0.2, "b": 0.01}, seed=4), before, GuardrailConfig()
    )
    assert same.passed, same.detail
    lost = slice_label_share(
        *_slices_with_labels({"a": 0.005, "b": 0.01}, seed=4), before, GuardrailConfig()
    )
    assert not lost.passed
    assert lost.detail.startswith("a:") and "v0007" in lost.detail
