"""Guardrails: named checks that refuse anomalous training data or models.

Each check returns a ``GuardrailResult`` (name, passed, measured value, limit, detail);
a ``GuardrailReport`` collects them, and ``raise_if_failed`` stops the job with the
failed names in the message (``slidr train`` exits non-zero with them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from events.errors import EXIT_GUARDRAIL, SlidrError

if TYPE_CHECKING:
    from models.pipeline import Prepared, Split


@dataclass(frozen=True)
class GuardrailConfig:
    min_clicks: int = 1_000  # training clicks (train + validation days)
    min_human_labels: int = 50
    min_slice_clicks: int = 50  # a slice with fewer clicks is ignored, not failed
    # slice_label_share: a slice's human labels must not fall significantly below
    # ``min_relative_slice_share`` times what the previous version's share of labels in
    # that slice predicts (one-sided Poisson test at ``density_alpha``). Real traffic has
    # slices where humans almost never buy (logged-out app visitors) or that are nearly
    # all robots: few labels there are normal, a collapse against last time is not.
    # There is no absolute floor: a first training is never blocked by it.
    min_relative_slice_share: float = 0.1
    # Human-label density: in every hour (each hour of each day, and each hour of the day
    # pooled over days) the labels must not fall significantly below
    # ``min_relative_human_density`` times what the data set's overall label share
    # predicts for that hour's clicks (one-sided Poisson test at ``density_alpha``). Night
    # hours carry fewer labels naturally (more robots), but not this few; purchase labels
    # missing for a few hours would teach the model that the traffic of those hours is
    # robotic.
    min_relative_human_density: float = 0.1
    density_alpha: float = 1e-3
    # The same test on sliding blocks of this many consecutive hours of the day, pooled
    # over days (0: off). A feed that loses the same few hours every day leaves each
    # single hour too few expected labels to be significant on a small data set; the
    # block pools them (three empty hours over three days of ~15 purchases an hour fail
    # at p ~ 1e-6, while the deepest natural 3-hour dip of simulated traffic is ~0.5).
    density_block_hours: int = 3


@dataclass
class GuardrailResult:
    name: str
    passed: bool
    value: Any
    limit: Any
    detail: str = ""


class GuardrailFailure(SlidrError, RuntimeError):
    """One or more guardrails failed; ``report`` has every result."""

    exit_code = EXIT_GUARDRAIL  # nothing registered or promoted

    def __init__(self, report: GuardrailReport) -> None:
        self.report = report
        failed = [r for r in report.results if not r.passed]
        super().__init__(
            "guardrail failed: "
            + "; ".join(f"{r.name} ({r.detail or f'{r.value} vs limit {r.limit}'})" for r in failed)
        )


@dataclass
class GuardrailReport:
    results: list[GuardrailResult] = field(default_factory=list)

    def add(self, name: str, passed: bool, value: Any, limit: Any, detail: str = "") -> None:
        self.results.append(GuardrailResult(name, bool(passed), value, limit, detail))

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failed_names(self) -> list[str]:
        return [r.name for r in self.results if not r.passed]

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GuardrailFailure(self)

    def to_dict(self) -> list[dict]:
        return [asdict(r) for r in self.results]


def check_training_data(
    prepared: Prepared,
    split: Split,
    config: GuardrailConfig = GuardrailConfig(),
    previous: dict | None = None,
) -> GuardrailReport:
    """Data guardrails on the fit days of a prepared data set; ``previous`` is the active
    version's manifest, whose label shares per slice say what to expect."""
    report = GuardrailReport()
    idx = np.concatenate([split.train, split.validation])
    human = prepared.labels.human[idx]
    report.add("min_clicks", len(idx) >= config.min_clicks, len(idx), config.min_clicks)
    report.add(
        "min_human_labels",
        human.sum() >= config.min_human_labels,
        int(human.sum()),
        config.min_human_labels,
    )
    report.results.append(slice_label_share(prepared.slices[idx], human, previous, config))
    ts = prepared.data.clicks.ts[idx]
    # Purchases count at their own event time, against the clicks of the same hours:
    # attribution spreads a gap in the purchase feed over the 24 h of clicks before it,
    # so by click time even hours without any purchase barely show.
    bought = prepared.data.purchases.ts
    bought = bought[(bought >= ts.min()) & (bought <= ts.max())] if len(ts) else bought[:0]
    is_purchase = np.r_[np.zeros(len(ts), dtype=bool), np.ones(len(bought), dtype=bool)]
    report.results.append(human_density(np.r_[ts, bought], is_purchase, config, "purchase"))
    report.results.append(human_density(ts, human, config, "human"))
    finite = bool(np.isfinite(prepared.features[idx]).all())
    report.add("finite_features", finite, finite, True)
    return report


def label_share_by_slice(slices: np.ndarray, human: np.ndarray) -> dict[str, dict]:
    """Per slice: clicks and the share of them labelled human."""
    out = {}
    for name in sorted(set(slices.tolist())):
        mask = slices == name
        out[str(name)] = {"clicks": int(mask.sum()), "human_share": float(human[mask].mean())}
    return out


def slice_label_share(
    slices: np.ndarray, human: np.ndarray, previous: dict | None, config: GuardrailConfig
) -> GuardrailResult:
    """``slice_label_share``: each slice's human labels against the previous version's
    share in that slice. Without a previous version it only reports the label-poor
    slices (they are trained on and get a fallback threshold, see the calibration)."""
    from scipy.stats import poisson

    now = label_share_by_slice(slices, human)
    poor = [
        f"{k} ({int(round(v['human_share'] * v['clicks']))} in {v['clicks']:,})"
        for k, v in now.items()
        if v["clicks"] >= config.min_slice_clicks and v["human_share"] * v["clicks"] < 20
    ]
    previous_report = previous or {}
    before = previous_report.get("label_share_by_slice")
    if not before:
        detail = "no previous version to compare with"
        if poor:
            detail += "; label-poor slices (trained on, fallback threshold): " + ", ".join(poor)
        return GuardrailResult(
            "slice_label_share", True, None, config.min_relative_slice_share, detail
        )
    drops, worst = [], None
    for name, figures in now.items():
        if name not in before or figures["clicks"] < config.min_slice_clicks:
            continue
        expected = before[name]["human_share"] * figures["clicks"]
        labelled = figures["human_share"] * figures["clicks"]
        if expected <= 0:
            continue
        worst = min(labelled / expected, worst if worst is not None else np.inf)
        if (
            poisson.cdf(round(labelled), config.min_relative_slice_share * expected)
            < config.density_alpha
        ):
            drops.append(
                f"{name}: {labelled:.0f} human labels vs ~{expected:.0f} expected from "
                f"{previous_report.get('version', 'the previous version')}"
            )
    detail = (
        "; ".join(drops)
        if drops
        else "every slice's human-label share as the previous version's predicts"
    )
    return GuardrailResult(
        "slice_label_share",
        not drops,
        None if worst is None else round(worst, 3),
        config.min_relative_slice_share,
        detail,
    )


def human_density(
    ts: np.ndarray, labels: np.ndarray, config: GuardrailConfig, kind: str = "human"
) -> GuardrailResult:
    """The label-density guardrail for one kind of label (``purchase`` or ``human``)."""
    from scipy.stats import poisson

    name = f"{kind}_label_density"
    if len(ts) == 0 or not labels.any():
        return GuardrailResult(
            name, False, 0, config.min_relative_human_density, f"no {kind} labels at all"
        )
    share = labels.mean()
    hour = np.floor_divide(ts, 3600).astype(np.int64)
    holes: list[str] = []
    worst = np.inf  # the smallest share of expected labels in any cell
    for grouping, cell in (("hour", hour), ("hour of day", hour % 24)):
        cells, inverse = np.unique(cell, return_inverse=True)
        clicks = np.bincount(inverse).astype(np.float64)
        # float64 with weights (numpy's stubs say an integer array).
        labelled: np.ndarray = np.bincount(inverse, weights=labels.astype(np.float64))
        expected = share * clicks
        relative = labelled / expected
        worst = min(float(relative.min()), worst)
        p = poisson.cdf(labelled, config.min_relative_human_density * expected)
        for c, n, e in zip(
            cells[p < config.density_alpha],
            labelled[p < config.density_alpha],
            expected[p < config.density_alpha],
            strict=True,
        ):
            where = (
                f"{np.datetime64(int(c) * 3600, 's')}Z"
                if grouping == "hour"
                else f"{int(c):02d}:00 UTC daily"
            )
            holes.append(f"{where} ({int(n)} vs ~{e:.0f} expected)")
    if config.density_block_hours > 1:
        hours = (hour % 24).astype(np.int64)
        by_hour = np.bincount(hours, minlength=24).astype(np.float64)
        labelled_by_hour = np.bincount(hours, weights=labels.astype(np.float64), minlength=24)
        k = config.density_block_hours
        clicks, labelled = np.zeros(24), np.zeros(24)  # in the block starting at each hour
        for j in range(k):
            clicks += np.roll(by_hour, -j)
            labelled += np.roll(labelled_by_hour, -j)
        expected = share * clicks
        seen = clicks > 0
        worst = min(worst, float((labelled[seen] / expected[seen]).min()))
        p = np.where(seen, poisson.cdf(labelled, config.min_relative_human_density * expected), 1.0)
        for h in np.nonzero(p < config.density_alpha)[0]:
            holes.append(
                f"{int(h):02d}:00-{int(h + k) % 24:02d}:00 UTC daily "
                f"({int(labelled[h])} vs ~{expected[h]:.0f} expected)"
            )
    if not holes:
        detail = f"no hour with too few {kind} labels (overall share {share:.4f})"
    else:
        detail = (
            f"{len(holes)} hours with significantly under "
            f"{config.min_relative_human_density:.0%} of the {kind} labels expected: "
            + ", ".join(holes[:6])
            + (" ..." if len(holes) > 6 else "")
        )
    return GuardrailResult(
        name, not holes, round(worst, 3), config.min_relative_human_density, detail
    )


# --------------------------------------------------------------------------------------
# Model guardrails: the new version against the active one on the same held-out clicks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelGuardrailConfig:
    """Limits of the model guardrails (``check_model``); every check is named after its field group.

    FPR checks are one-sided binomial tests: a check fails when the realised count of
    invalidated purchasing clicks would be unlikely (p < ``fpr_alpha``) had the true FPR
    been at the limit, so that a held-out day with few purchases does not reject a model
    by chance, while a real overshoot on a large day does.
    """

    # heldout_ivr_ratio: new IVR / active IVR on the held-out day within [min, max].
    min_ivr_ratio: float = 0.5
    max_ivr_ratio: float = 2.0
    # heldout_fpr: new FPR <= max(fpr_budget_factor * budget, fpr_active_factor * active FPR).
    fpr_budget_factor: float = 1.5
    fpr_active_factor: float = 1.5
    fpr_alpha: float = 0.05
    min_purchasing_clicks: int = 30  # fewer on the held-out day: the FPR check is skipped
    # slice_fpr_budget: each calibrated slice's realised FPR <= max(target * factor,
    # target + abs_tolerance), slices with at least ``min_slice_purchasing_clicks``.
    slice_fpr_factor: float = 1.5
    slice_fpr_abs_tolerance: float = 0.02
    min_slice_purchasing_clicks: int = 20
    # slice_ivr_jump: (new + s) / (active + s) per slice within [min factor, max factor],
    # s = ``slice_ivr_smoothing`` so that slices near 0 % do not jump from 0.1 % to 0.4 %.
    # A jump up invalidates humans; a collapse lets robots through (looser: retraining on
    # more days legitimately sharpens small slices).
    max_slice_ivr_factor: float = 3.0
    min_slice_ivr_factor: float = 0.25
    slice_ivr_smoothing: float = 0.01
    min_slice_clicks: int = 200
    # score_psi: population stability index of the new scores against the active
    # version's scores on the same clicks (deciles of the active scores). 0.1 is "some
    # shift", 0.25 "a large shift" by the usual rule; retraining on a newer window moves
    # scores more than a deployed model drifts, hence the looser default. Models averaged
    # over day folds, with embeddings, move their score scale between healthy retrains
    # more than one MLP did: two consecutive retrains of 20k-click days measured PSI
    # 0.87-1.12 (tests/models/test_lifecycle.py), each slice's verdicts being recalibrated
    # anyway; a score distribution squeezed to half its range measures 4.4.
    max_score_psi: float = 1.5
    psi_bins: int = 10


@dataclass
class HeldOut:
    """The held-out day as the new version sees it (rows in the same order everywhere)."""

    features: np.ndarray  # (clicks, N_FEATURES) float32, what the active version is scored on
    slices: np.ndarray  # slice name per click
    purchasing: np.ndarray  # bool: an attributed purchase followed the click
    scores: np.ndarray  # the new version's scores in [0, 1]
    invalid: np.ndarray  # the new version's verdicts with its slice thresholds


def population_stability_index(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """PSI of ``actual`` against ``expected`` over quantile bins of ``expected``.

    sum_b (a_b - e_b) * ln(a_b / e_b) with bin shares floored at 1e-4 (an empty bin
    would make it infinite). 0 for identical distributions.
    """
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if len(expected) == 0 or len(actual) == 0:
        return 0.0
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    e = np.bincount(np.searchsorted(edges, expected, side="right"), minlength=len(edges) + 1)
    a = np.bincount(np.searchsorted(edges, actual, side="right"), minlength=len(edges) + 1)
    e = np.maximum(e / len(expected), 1e-4)
    a = np.maximum(a / len(actual), 1e-4)
    return float(np.sum((a - e) * np.log(a / e)))


def _exceeds(
    invalid_purchasing: int, purchasing: int, limit: float, alpha: float
) -> tuple[bool, float]:
    """Whether ``invalid_purchasing`` of ``purchasing`` is significantly above rate ``limit``."""
    from scipy.stats import binom

    if purchasing == 0 or invalid_purchasing <= limit * purchasing:
        return False, 1.0
    p = float(binom.sf(invalid_purchasing - 1, purchasing, min(1.0, limit)))
    return p < alpha, p


def _verdicts_of(manifest: dict, scores: np.ndarray, slices: np.ndarray) -> np.ndarray:
    """A registered version's verdicts from its manifest's slice thresholds."""
    cal = manifest["calibration"]
    default = float(cal["default_threshold"])
    thresholds = np.array([float(cal["thresholds"].get(str(s), default)) for s in slices])
    return scores >= thresholds


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def check_model(
    result: dict,
    active_manifest: dict | None,
    held_out: HeldOut,
    active_scores: np.ndarray | None = None,
    config: ModelGuardrailConfig = ModelGuardrailConfig(),
) -> GuardrailReport:
    """Model guardrails on the held-out day: ``heldout_ivr_ratio``, ``heldout_fpr``,
    ``slice_fpr_budget``, ``slice_ivr_jump`` and ``score_psi``.

    ``result`` is the training summary (``run_training``: its ``calibration`` gives the
    FPR budget and the slices' FPR targets). The active version is judged on the same
    held-out clicks when ``active_scores`` (its scores on ``held_out.features``) are
    given, else by the figures of its own evaluation (manifest ``metrics.test``; no PSI
    then). Without an active version only the absolute checks can fail.
    """
    from models import metrics

    report = GuardrailReport()
    n = len(held_out.scores)
    purchasing = np.asarray(held_out.purchasing, dtype=bool)
    zeros = np.zeros(n, dtype=bool)
    new = metrics.compute_metrics(held_out.invalid, purchasing, zeros, held_out.slices)
    budget = float(result["calibration"]["budget"])

    active: dict | None = None
    basis = "no active version"
    if active_manifest is not None:
        if active_scores is not None:
            active_invalid = _verdicts_of(
                active_manifest, np.asarray(active_scores), held_out.slices
            )
            active = metrics.compute_metrics(active_invalid, purchasing, zeros, held_out.slices)
            basis = f"{active_manifest['version']} on the same held-out clicks"
        else:
            active = active_manifest["metrics"]["test"]
            basis = f"{active_manifest['version']}'s own held-out day (scores not comparable)"

    # heldout_ivr_ratio
    new_ivr = new["overall"]["ivr"] or 0.0
    if active is None:
        report.add(
            "heldout_ivr_ratio",
            True,
            None,
            [config.min_ivr_ratio, config.max_ivr_ratio],
            f"IVR {new_ivr:.4f}; {basis} to compare with",
        )
    else:
        active_ivr = active["overall"]["ivr"] or 0.0
        ratio = new_ivr / active_ivr if active_ivr > 0 else (1.0 if new_ivr == 0 else float("inf"))
        ok = config.min_ivr_ratio <= ratio <= config.max_ivr_ratio
        report.add(
            "heldout_ivr_ratio",
            ok,
            round(ratio, 4),
            [config.min_ivr_ratio, config.max_ivr_ratio],
            f"IVR {new_ivr:.4f} vs {active_ivr:.4f} ({basis})",
        )

    # heldout_fpr
    overall = new["overall"]
    active_fpr = None if active is None else active["overall"]["fpr"]
    limit = config.fpr_budget_factor * budget
    if active_fpr is not None:
        limit = max(limit, config.fpr_active_factor * active_fpr)
    if overall["purchasing_clicks"] < config.min_purchasing_clicks:
        report.add(
            "heldout_fpr",
            True,
            overall["fpr"],
            round(limit, 4),
            f"only {overall['purchasing_clicks']} purchasing clicks on the held-out day: "
            "not judged",
        )
    else:
        invalid_purchasing = int(np.count_nonzero(held_out.invalid & purchasing))
        bad, p = _exceeds(invalid_purchasing, overall["purchasing_clicks"], limit, config.fpr_alpha)
        report.add(
            "heldout_fpr",
            not bad,
            round(overall["fpr"], 4),
            round(limit, 4),
            f"FPR {overall['fpr']:.4f} ({invalid_purchasing}/{overall['purchasing_clicks']}) "
            f"vs limit {limit:.4f} = max({config.fpr_budget_factor} x budget {budget}, "
            f"{config.fpr_active_factor} x active {_fmt(active_fpr)}); p = {p:.3g}",
        )

    # slice_fpr_budget
    offenders, judged = [], 0
    for row in result["calibration"].get("slices", []):
        name, target = row["name"], row.get("fpr_target")
        figures = new["slices"].get(name)
        if figures is None or not row.get("calibrated") or target is None:
            continue
        if figures["purchasing_clicks"] < config.min_slice_purchasing_clicks:
            continue
        judged += 1
        limit_s = max(target * config.slice_fpr_factor, target + config.slice_fpr_abs_tolerance)
        mask = np.asarray(held_out.slices).astype(str) == name
        k = int(np.count_nonzero(held_out.invalid[mask] & purchasing[mask]))
        bad, p = _exceeds(k, figures["purchasing_clicks"], limit_s, config.fpr_alpha)
        if bad:
            offenders.append(
                f"{name}: FPR {figures['fpr']:.4f} ({k}/{figures['purchasing_clicks']}) "
                f"> {limit_s:.4f} (target {target:.4f}, p = {p:.3g})"
            )
    report.add(
        "slice_fpr_budget",
        not offenders,
        len(offenders),
        0,
        "; ".join(offenders)
        if offenders
        else f"{judged} slices within their FPR target (x{config.slice_fpr_factor} or "
        f"+{config.slice_fpr_abs_tolerance})",
    )

    # slice_ivr_jump
    if active is None:
        report.add(
            "slice_ivr_jump",
            True,
            None,
            [config.min_slice_ivr_factor, config.max_slice_ivr_factor],
            basis,
        )
    else:
        jumps, lowest, highest = [], 1.0, 1.0
        s = config.slice_ivr_smoothing
        for name, figures in new["slices"].items():
            before = active["slices"].get(name)
            if before is None or figures["clicks"] < config.min_slice_clicks:
                continue
            a, b = figures["ivr"] or 0.0, before["ivr"] or 0.0
            factor = (a + s) / (b + s)
            lowest, highest = min(lowest, factor), max(highest, factor)
            if not config.min_slice_ivr_factor <= factor <= config.max_slice_ivr_factor:
                jumps.append(f"{name}: IVR {b:.4f} -> {a:.4f} (x{factor:.2f} smoothed)")
        limits = [config.min_slice_ivr_factor, config.max_slice_ivr_factor]
        value = highest if highest >= 1 / lowest else lowest
        report.add(
            "slice_ivr_jump",
            not jumps,
            round(value, 3),
            limits,
            "; ".join(jumps) if jumps else f"every slice's IVR within x{limits} ({basis})",
        )

    # score_psi
    if active_scores is None:
        report.add(
            "score_psi",
            True,
            None,
            config.max_score_psi,
            f"{basis}: no scores on the same clicks to compare",
        )
    else:
        value = population_stability_index(active_scores, held_out.scores, config.psi_bins)
        report.add(
            "score_psi",
            value <= config.max_score_psi,
            round(value, 4),
            config.max_score_psi,
            f"PSI {value:.3f} of the new scores vs {basis}",
        )
    return report
