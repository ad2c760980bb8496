"""Slice-level threshold calibration (SPEC §5): spend an overall FPR budget where it pays.

One global threshold spends the false-positive budget unevenly: a slice whose humans score
high (say, app traffic) eats most of it, while a slice where robots are easy to tell apart
stays under-invalidated. SLIDR instead picks one FPR per slice. For slices s with n_s clicks
and p_s purchasing clicks, IVR_s(f) being the slice's IVR at slice FPR f, choose f_s to

    maximise   sum_s n_s IVR_s(f_s) / N                      N = sum_s n_s
    subject to sum_s p_s f_s / P <= B                        P = sum_s p_s
               f_s >= f_min_s                                (robotic coverage >= C_s)
               0 <= f_s <= 1

and set the slice's threshold to the score that gives f_s on the calibration data.

Two models of IVR_s(f):

- ``"quadratic"`` (the paper): a concave quadratic a + b f + c f^2, c <= 0, fitted to the
  slice's empirical curve (:func:`fit_concave_quadratic`) on [f_min_s, f_min_s + 2B] by
  default (``fit_span``), where the optimum lies; f_s is kept in that range, since a fit
  says nothing beyond the data it saw. The problem is then a concave QP, solved with cvxpy
  (Clarabel); if cvxpy is missing or fails, by water-filling on the Lagrange multiplier of
  the budget (see :func:`_water_fill`).
- ``"empirical"``: the measured curve itself. Its upper concave hull (over FPRs >= f_min_s)
  is piecewise linear, and maximising a sum of concave piecewise-linear functions under one
  linear budget is a fractional knapsack: taking hull segments in decreasing order of gain
  per unit of budget is optimal. Hull vertices are real thresholds, so only the one slice
  whose last segment is bought in part lands between them and realises a little less than
  the hull promises. The result reports how far the quadratic allocation falls below this
  optimum (``objective["approximation_loss"]``, in IVR points, measured on the hulls).

The f_min_s come from the empirical curve: the least slice FPR at which the share of robotic
clicks invalidated reaches C_s. Slices with too few purchasing clicks have no usable FPR
curve; they get the global threshold (the one reaching FPR B on all clicks), or a stricter
one where their own few purchasing clicks, or those of a stand-in slice, ask for it (see
``calibrate_slices``); their FPR spend is charged to the budget first, and the rest is
shared by the calibrated slices.

Only numpy is imported at module level: scoring needs :func:`apply_thresholds` and must not
pull in the solver. cvxpy is imported when a QP is solved.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from events.errors import SlidrError
from models.metrics import (
    Curve,
    compute_metrics,
    curve,
    split_slices,
    threshold_for_fpr,
)

log = logging.getLogger(__name__)

Method = Literal["quadratic", "empirical"]
# Points of the uniform FPR grid the quadratic is fitted on.
FIT_GRID_POINTS = 101
# Width of each slice's quadratic fit range beyond its f_min, in multiples of the budget.
DEFAULT_FIT_SPAN = 2.0
# Slack allowed on the budget and on bounds when checking a solver's answer.
_TOL = 1e-9


class CalibrationError(SlidrError, ValueError):
    """The calibration problem has no solution (e.g. coverage minima exceed the budget)."""


# --------------------------------------------------------------------------------------
# Curves: frontier, hull, quadratic fit
# --------------------------------------------------------------------------------------


def frontier(fpr: npt.ArrayLike, ivr: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The best IVR reachable at each distinct FPR: a non-decreasing step function.

    A threshold cannot do better than the best curve point whose FPR does not exceed f, so
    IVR(f) = max{ivr_i : fpr_i <= f}. Returns the distinct FPRs (ascending, NaN dropped) and
    that running maximum at each.
    """
    x = np.asarray(fpr, dtype=float)
    y = np.asarray(ivr, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if x.size == 0:
        raise ValueError("empty curve")
    order = np.lexsort((y, x))
    x, y = x[order], np.maximum.accumulate(y[order])
    last_of_each = np.r_[x[1:] != x[:-1], True]
    return x[last_of_each], y[last_of_each]


def upper_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the upper concave hull of points with strictly increasing ``x``.

    Andrew's monotone chain, upper half: a point is dropped when it lies on or below the
    chord from its predecessor to the next point. Linear in the number of points.
    """
    hx: list[float] = []
    hy: list[float] = []
    for xi, yi in zip(x.tolist(), y.tolist(), strict=True):
        while len(hx) >= 2 and (hy[-1] - hy[-2]) * (xi - hx[-2]) <= (yi - hy[-2]) * (
            hx[-1] - hx[-2]
        ):
            hx.pop()
            hy.pop()
        hx.append(xi)
        hy.append(yi)
    return np.asarray(hx), np.asarray(hy)


def fit_concave_quadratic(
    fpr: npt.ArrayLike,
    ivr: npt.ArrayLike,
    f_max: float | None = None,
    f_min: float = 0.0,
    n_grid: int = FIT_GRID_POINTS,
) -> tuple[float, float, float]:
    """Least-squares fit of IVR(f) = a + b f + c f^2 with c <= 0 on [f_min, f_max].

    The empirical curve has one point per distinct score, so its points crowd where scores
    are dense; fitting them directly would let those regions dominate. Instead the curve's
    frontier (best IVR at FPR <= f, see :func:`frontier`) is read on ``n_grid`` uniformly
    spaced FPRs in [f_min, f_max] (default: [0, the curve's largest FPR]), and every grid
    point weighs the same. :func:`calibrate_slices` fits each slice on the FPR range its f_s
    can take, so the quadratic is accurate where it is used.

    The constraint c <= 0 keeps the optimisation concave. A least-squares problem with one
    linear inequality has its optimum either unconstrained or on the boundary, so: fit the
    full quadratic; if it comes out convex (c > 0), the constrained optimum has c = 0 and is
    the straight-line fit.

    Returns:
        ``(a, b, c)``, IVR as a fraction of clicks, f as a fraction of purchasing clicks.
    """
    fx, fy = frontier(fpr, ivr)
    top = float(fx[-1]) if f_max is None else float(min(f_max, 1.0))
    bottom = max(float(f_min), 0.0)
    if top <= bottom:
        # No room to move: IVR is the constant reachable there.
        return float(_step_value(fx, fy, bottom)), 0.0, 0.0
    grid = np.linspace(bottom, top, n_grid)
    target = _step_value(fx, fy, grid)

    design = np.column_stack([np.ones_like(grid), grid, grid**2])
    (a, b, c), *_ = np.linalg.lstsq(design, target, rcond=None)
    if c > 0:
        (a, b), *_ = np.linalg.lstsq(design[:, :2], target, rcond=None)
        c = 0.0
    return float(a), float(b), float(c)


def _step_value(fx: np.ndarray, fy: np.ndarray, f: npt.ArrayLike) -> np.ndarray:
    """Frontier value at FPR ``f`` (the first point's value below the frontier's start)."""
    i = np.searchsorted(fx, np.asarray(f, dtype=float) + _TOL, side="right") - 1
    return fy[np.maximum(i, 0)]


def min_fpr_for_coverage(c: Curve, required: float) -> tuple[float, bool]:
    """Least slice FPR whose threshold invalidates at least ``required`` of robotic clicks.

    Returns ``(f_min, reachable)``. ``f_min`` is 0 when nothing is required or the slice has
    no robotic clicks. Coverage grows along the curve, so the answer is the FPR of the first
    point that reaches it. When no point does, ``f_min`` is the FPR of the first point at the
    highest coverage there is (1 if none is defined) and ``reachable`` is False.
    """
    if required <= 0 or c.r == 0:
        return 0.0, True
    enough = c.invalid_robotic >= required * c.r - _TOL
    if enough.any():
        return float(c.fpr[int(np.argmax(enough))]), True
    best = int(np.argmax(c.invalid_robotic == c.invalid_robotic.max()))
    f = float(c.fpr[best])
    return (1.0 if math.isnan(f) else f), False


@dataclass(frozen=True)
class SliceCurve:
    """A slice's empirical IVR-vs-FPR curve with the models the optimiser uses."""

    name: str
    n: int  # clicks
    p: int  # purchasing clicks
    r: int  # robotic clicks
    curve: Curve
    frontier_fpr: np.ndarray
    frontier_ivr: np.ndarray
    hull_fpr: np.ndarray  # upper concave hull of the frontier on [f_min, 1]
    hull_ivr: np.ndarray
    coefficients: tuple[float, float, float]  # (a, b, c) of a + b f + c f^2, c <= 0
    fit_range: tuple[float, float]  # the quadratic was fitted on this FPR range
    min_coverage: float  # C_s
    f_min: float
    coverage_reachable: bool

    @classmethod
    def from_curve(
        cls,
        name: str,
        c: Curve,
        min_coverage: float,
        f_min: tuple[float, bool],
        fit_range: tuple[float, float],
    ) -> SliceCurve:
        """Frontier, hull (on [f_min, 1]) and quadratic (on ``fit_range``) of a curve.

        ``f_min`` is :func:`min_fpr_for_coverage`'s answer, ``(f_min, reachable)``.
        """
        lowest, reachable = f_min
        fx, fy = frontier(c.fpr, c.ivr)
        allowed = fx >= lowest
        hx, hy = upper_hull(fx[allowed], fy[allowed])
        lo, hi = float(fit_range[0]), float(fit_range[1])
        return cls(
            name=name,
            n=c.n,
            p=c.p,
            r=c.r,
            curve=c,
            frontier_fpr=fx,
            frontier_ivr=fy,
            hull_fpr=hx,
            hull_ivr=hy,
            coefficients=fit_concave_quadratic(c.fpr, c.ivr, f_max=hi, f_min=lo),
            fit_range=(lo, hi),
            min_coverage=min_coverage,
            f_min=float(lowest),
            coverage_reachable=reachable,
        )

    def ivr_fit(self, f: npt.ArrayLike) -> np.ndarray:
        """IVR the fitted quadratic predicts at slice FPR ``f``."""
        a, b, c = self.coefficients
        f = np.asarray(f, dtype=float)
        return a + b * f + c * f * f

    def ivr_hull(self, f: npt.ArrayLike) -> np.ndarray:
        """IVR on the upper concave hull of the empirical curve at slice FPR ``f``.

        The hull is taken over the frontier points at FPR >= f_min only: below f_min no
        allocation may go, and a hull reaching there would overstate IVR just above it.
        """
        return np.interp(np.asarray(f, dtype=float), self.hull_fpr, self.hull_ivr)

    def ivr_step(self, f: npt.ArrayLike) -> np.ndarray:
        """IVR a single threshold really reaches at slice FPR at most ``f``."""
        return _step_value(self.frontier_fpr, self.frontier_ivr, f)


# --------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------


def _solve_qp_cvxpy(
    weight: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    cost: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    avail: float,
) -> tuple[np.ndarray, str]:
    """max sum w (b f + c f^2) s.t. cost.f <= avail, lo <= f <= hi, with cvxpy/Clarabel."""
    import cvxpy as cp

    f = cp.Variable(weight.size)
    # weight * c <= 0, so the quadratic term is concave (DCP: nonpositive times convex).
    objective = cp.Maximize(
        cp.sum(cp.multiply(weight * b, f)) + cp.sum(cp.multiply(weight * c, cp.square(f)))
    )
    constraints = [cost @ f <= avail, f >= lo, f <= hi]
    problem = cp.Problem(objective, constraints)
    problem.solve(solver=cp.CLARABEL)
    if problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or f.value is None:
        raise RuntimeError(f"cvxpy status {problem.status}")
    return np.asarray(f.value, dtype=float), str(problem.status)


def _water_fill(
    weight: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    cost: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    avail: float,
    iterations: int = 200,
) -> np.ndarray:
    """The same concave QP solved from its KKT conditions, without a solver.

    For a budget multiplier lambda >= 0 each slice maximises w (b f + c f^2) - lambda cost f
    on [lo, hi] on its own: f(lambda) = clip((w b - lambda cost) / (-2 w c), lo, hi) when
    c < 0, and hi or lo by the sign of w b - lambda cost when c = 0. Spending falls as lambda
    rises, so bisection finds the lambda where it meets the budget. Between the last
    infeasible and the first feasible lambda the allocations are mixed to spend the budget
    exactly, which also settles linear slices whose gain equals lambda.
    """

    def alloc(lam: float) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            curved = (weight * b - lam * cost) / (-2.0 * weight * c)
        linear = np.where(weight * b > lam * cost, hi, lo)
        return np.clip(np.where(c < 0, curved, linear), lo, hi)

    spent = lambda f: float(cost @ f)  # noqa: E731
    f0 = alloc(0.0)
    if spent(f0) <= avail:
        return f0
    # At this lambda every slice's marginal gain at lo is below the price: all sit at lo.
    lam_hi = float(np.max(weight * (b + 2 * c * lo) / cost)) * 2 + 1.0
    lam_lo = 0.0
    for _ in range(iterations):
        mid = 0.5 * (lam_lo + lam_hi)
        if spent(alloc(mid)) > avail:
            lam_lo = mid
        else:
            lam_hi = mid
    f_feasible, f_over = alloc(lam_hi), alloc(lam_lo)
    gap = spent(f_over) - spent(f_feasible)
    theta = 0.0 if gap <= 0 else (avail - spent(f_feasible)) / gap
    return f_feasible + np.clip(theta, 0.0, 1.0) * (f_over - f_feasible)


def _allocate_on_hulls(
    hulls: list[tuple[np.ndarray, np.ndarray]],
    weight: np.ndarray,
    cost: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    avail: float,
) -> np.ndarray:
    """Exact optimum of sum w_s H_s(f_s) s.t. cost.f <= avail, lo <= f <= hi, H_s concave
    piecewise linear (the hulls, given by their vertices).

    Every slice starts at lo_s. Each hull segment beyond it costs cost_s * length and gains
    w_s * slope * length; concavity means a slice's segments come in decreasing slope, so
    buying segments by decreasing gain per unit cost (the last one partly) is optimal, as in
    the fractional knapsack.
    """
    seg_slice, seg_len, seg_ratio = [], [], []
    for s, (hx, hy) in enumerate(hulls):
        inner = hx[(hx > lo[s]) & (hx < hi[s])]
        xs = np.r_[lo[s], inner, hi[s]]
        ys = np.interp(xs, hx, hy)
        dx, dy = np.diff(xs), np.diff(ys)
        ok = dx > 0
        seg_slice.append(np.full(int(ok.sum()), s))
        seg_len.append(dx[ok])
        seg_ratio.append(weight[s] * (dy[ok] / dx[ok]) / cost[s])
    slice_of = np.concatenate(seg_slice) if seg_slice else np.zeros(0, dtype=int)
    length = np.concatenate(seg_len) if seg_len else np.zeros(0)
    ratio = np.concatenate(seg_ratio) if seg_ratio else np.zeros(0)

    useful = ratio > 0
    slice_of, length, ratio = slice_of[useful], length[useful], ratio[useful]
    order = np.argsort(-ratio, kind="stable")
    slice_of, length = slice_of[order], length[order]
    seg_cost = cost[slice_of] * length
    left = avail - float(cost @ lo)
    before = np.r_[0.0, np.cumsum(seg_cost)[:-1]]
    share = np.clip((left - before) / np.where(seg_cost > 0, seg_cost, 1.0), 0.0, 1.0)
    bought = np.bincount(slice_of, weights=share * length, minlength=lo.size)
    return np.minimum(lo + bought, hi)


def _repair_budget(f: np.ndarray, cost: np.ndarray, lo: np.ndarray, avail: float) -> np.ndarray:
    """Pull a solver's answer back inside the budget (it may overshoot by its tolerance).

    The excess is taken from slices above their minimum, in proportion to their slack.
    """
    excess = float(cost @ f) - avail
    slack = (f - lo) * cost
    if excess <= 0 or slack.sum() <= 0:
        return f
    return f - np.minimum(1.0, excess / slack.sum()) * (f - lo)


# --------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


@dataclass
class SliceCalibration:
    """One slice's row of the calibration: what was asked, chosen and realised."""

    name: str
    n: int  # clicks
    p: int  # purchasing clicks
    robotic: int  # robotic clicks
    calibrated: bool  # False: too few purchasing clicks, the global threshold applies
    min_coverage: float  # C_s
    f_min: float | None  # least slice FPR reaching C_s (None when not calibrated)
    coverage_reachable: bool
    fpr_target: float | None  # f_s chosen by the optimiser
    threshold: float
    predicted_ivr: float | None  # IVR_s(f_s) from the method's model (fit or hull)
    coefficients: tuple[float, float, float] | None
    fit_range: tuple[float, float] | None
    ivr: float | None  # realised on the calibration data
    fpr: float | None
    coverage: float | None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": self.n,
            "p": self.p,
            "robotic": self.robotic,
            "calibrated": self.calibrated,
            "min_coverage": self.min_coverage,
            "f_min": self.f_min,
            "coverage_reachable": self.coverage_reachable,
            "fpr_target": self.fpr_target,
            "threshold": self.threshold,
            "predicted_ivr": _none_if_nan(self.predicted_ivr),
            "coefficients": None if self.coefficients is None else list(self.coefficients),
            "fit_range": None if self.fit_range is None else list(self.fit_range),
            "ivr": self.ivr,
            "fpr": self.fpr,
            "coverage": self.coverage,
            "note": self.note,
        }


@dataclass
class CalibrationResult:
    """Per-slice thresholds and how they were reached.

    ``objective`` holds, in IVR points (fraction of all clicks): ``predicted`` (the chosen
    f_s under the method's own model), ``hull`` (the chosen f_s read on the empirical hulls),
    ``hull_optimum`` (the best any allocation reaches on the hulls, i.e. the empirical
    method's optimum), ``approximation_loss`` = hull_optimum - hull (0 for the empirical
    method), and ``realised`` (the IVR the thresholds give on the data). Uncalibrated slices
    count with their realised IVR in all of them.
    """

    method: str
    budget: float
    thresholds: dict[str, float]
    default_threshold: float  # the global threshold at FPR = budget
    slices: dict[str, SliceCalibration]
    status: str  # solver status, e.g. "optimal"
    solver: str  # "CLARABEL", "water-filling" or "greedy-hull"
    ivr: float | None  # realised overall
    fpr: float | None
    coverage: float | None
    objective: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    curves: dict[str, SliceCurve] = field(default_factory=dict, repr=False)

    def threshold_for(self, slice_name: str) -> float:
        """The slice's threshold; the global one for a slice not seen in calibration."""
        return self.thresholds.get(str(slice_name), self.default_threshold)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (curves left out; see :meth:`Curve.to_dict`)."""
        return {
            "method": self.method,
            "budget": self.budget,
            "thresholds": dict(self.thresholds),
            "default_threshold": self.default_threshold,
            "status": self.status,
            "solver": self.solver,
            "ivr": self.ivr,
            "fpr": self.fpr,
            "coverage": self.coverage,
            "objective": {k: float(v) for k, v in self.objective.items()},
            "warnings": list(self.warnings),
            # A list of rows (each names its slice), ready to print as a table.
            "slices": [row.to_dict() for row in self.slices.values()],
        }


# --------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------


def global_threshold_at_fpr(
    scores: npt.ArrayLike, purchasing: npt.ArrayLike, overall_fpr: float
) -> float:
    """The single threshold whose FPR over all clicks is at most ``overall_fpr``."""
    return threshold_for_fpr(scores, purchasing, overall_fpr)


def apply_thresholds(
    scores: npt.ArrayLike,
    slices: npt.ArrayLike,
    thresholds: dict[str, float],
    default: float,
) -> np.ndarray:
    """Per click, whether ``score >= threshold of its slice`` (``default`` for unknown slices)."""
    names, codes = split_slices(slices)
    table = np.array([thresholds.get(str(name), default) for name in names], dtype=float)
    return np.asarray(scores, dtype=float) >= table[codes]


def _coverage_by_slice(min_coverage: dict[str, float] | float, names: np.ndarray) -> np.ndarray:
    if isinstance(min_coverage, dict):
        required = np.array([float(min_coverage.get(str(s), 0.0)) for s in names])
    else:
        required = np.full(names.size, float(min_coverage))
    if ((required < 0) | (required > 1)).any():
        raise ValueError("min_coverage must lie in [0, 1]")
    return required


def calibrate_slices(
    scores: npt.ArrayLike,
    slices: npt.ArrayLike,
    purchasing: npt.ArrayLike,
    robotic: npt.ArrayLike,
    budget: float,
    min_coverage: dict[str, float] | float = 0.0,
    method: Method = "quadratic",
    min_purchases: int = 20,
    fit_span: float | None = DEFAULT_FIT_SPAN,
    max_slice_fpr: float = 1.0,
    stand_ins: Mapping[str, str] | None = None,
    lone_fpr: float | None = None,
) -> CalibrationResult:
    """Per-slice thresholds maximising overall IVR within an overall FPR budget (SPEC §5).

    Args:
        scores: model score per click (invalid when ``score >= threshold``).
        slices: slice name per click.
        purchasing: per click, whether it led to a purchase.
        robotic: per click, whether its session is robotic (:func:`robotic_sessions`).
        budget: B, the overall FPR allowed, a fraction of all purchasing clicks.
        min_coverage: C_s per slice name (missing slices: 0), or one value for all.
        method: ``"quadratic"`` (fitted concave quadratics, QP) or ``"empirical"`` (exact
            on the empirical curves' concave hulls).
        min_purchases: slices with fewer purchasing clicks get the global threshold, or a
            stricter one (see ``stand_ins``).
        max_slice_fpr: the most FPR any one slice may get (f_s <= it). The optimum likes
            to spend the budget where robots are dense, which can take one slice's
            humans far past the overall budget; a cap keeps every slice's humans within
            a bound. Coverage minima above it are cut to it (with a warning).
        fit_span: quadratic method only: each slice's quadratic is fitted on
            [f_min_s, f_min_s + fit_span * budget] (cut at the most FPR the budget could
            give the slice), and f_s stays in that range, since a fit is not extrapolated.
            ``None``: the whole feasible range. IVR curves bend sharply near FPR 0, and a
            quadratic over a wide range misses that bend, so a narrow span fits better where
            the optimum lies; the empirical method is never capped and reports what the cap
            and the fit cost (``objective["approximation_loss"]``).
        stand_ins: per slice name, a slice whose purchasing clicks stand in for its humans
            when it has too few of its own (e.g. ``mobile/logged_out`` ->
            ``mobile/logged_in``: the model cannot see signed-in status, so a device's
            signed-in buyers are the nearest labelled humans of its signed-out traffic). A
            label-poor slice never gets a threshold below the one at FPR ``budget`` on its
            calibrated stand-in's purchasing clicks. Stand-ins that are label-poor
            themselves, or absent, are ignored.
        lone_fpr: a label-poor slice without a calibrated stand-in ("lone": no labelled
            humans like its own anywhere, e.g. unknown devices, signed out) never gets a
            threshold below the one at this FPR on all purchasing clicks: it invalidates
            only what scores above nearly every labelled human. ``None``: no such floor.

    Raises:
        CalibrationError: the coverage minima (plus the spend of the slices on the global
            threshold) exceed the budget; the message names the slices.
    """
    if method not in ("quadratic", "empirical"):
        raise ValueError(f"unknown method {method!r}")
    if not 0 <= budget <= 1:
        raise ValueError("budget must lie in [0, 1]")
    s = np.asarray(scores, dtype=float)
    pur = np.asarray(purchasing, dtype=bool)
    rob = np.asarray(robotic, dtype=bool)
    names, codes = split_slices(slices)
    if not (s.shape == pur.shape == rob.shape == codes.shape):
        raise ValueError("scores, slices, purchasing and robotic must have the same length")
    n_total, p_total = s.size, int(pur.sum())
    if p_total == 0:
        raise CalibrationError("no purchasing clicks: the FPR budget is undefined")

    required = _coverage_by_slice(min_coverage, names)
    global_t = global_threshold_at_fpr(s, pur, budget)
    warnings: list[str] = []

    # Group the clicks of each slice (one sort, then contiguous runs).
    by_slice = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[by_slice], np.arange(names.size + 1))
    members = [by_slice[bounds[i] : bounds[i + 1]] for i in range(names.size)]
    n_s = np.array([m.size for m in members])
    p_s = np.array([int(pur[m].sum()) for m in members])
    calibrated = p_s >= max(min_purchases, 1)

    # Label-poor slices fall back conservatively, to the strictest of: the global
    # threshold; the slice's own threshold at the budget (a handful of labels cannot
    # calibrate a slice, but can refuse a threshold that is plainly too low for it); and
    # its stand-in's threshold at the budget (its few buyers may not look like its other
    # humans at all: on `slidr simulate --world proxy_lies` seed 5 the global threshold
    # invalidated 5.3% of mobile/logged_out humans, whose 31 buyers all scored below it;
    # mobile/logged_in's buyers took that to 1.9%). A slice without a stand-in has no
    # labelled humans like its own anywhere, so it gets a floor read off all buyers far
    # out in their tail (``lone_fpr``). They spend their budget share first.
    index = {str(name): k for k, name in enumerate(names.tolist())}
    lone_t = None if lone_fpr is None else threshold_for_fpr(s, pur, lone_fpr)
    fallback: dict[int, tuple[float, str]] = {}
    for i in np.flatnonzero(~calibrated).tolist():
        m = members[i]
        candidates = [(global_t, "global threshold")]
        if p_s[i]:
            own = threshold_for_fpr(s[m], pur[m], budget)
            candidates.append((own, f"the slice's own threshold at FPR {budget}"))
        stand_in = (stand_ins or {}).get(str(names[i]))
        other = None if stand_in is None else index.get(stand_in)
        if other is not None and calibrated[other]:
            sm = members[other]
            candidates.append(
                (
                    threshold_for_fpr(s[sm], pur[sm], budget),
                    f"the threshold at FPR {budget} on {names[other]}'s purchasing clicks",
                )
            )
        elif lone_t is not None:
            candidates.append(
                (lone_t, f"no stand-in: the threshold at FPR {lone_fpr:g} on all purchasing clicks")
            )
        threshold, source = max(candidates, key=lambda c: c[0])
        stricter = ", stricter than the global one" if threshold > global_t else ""
        why = f"{p_s[i]} purchasing clicks (< {min_purchases}): {source}{stricter}"
        fallback[int(i)] = (threshold, why)
        warnings.append(f"slice {str(names[i])!r}: {why}")
    fixed_spend = (
        sum(int((pur[members[i]] & (s[members[i]] >= t)).sum()) for i, (t, _) in fallback.items())
        / p_total
    )
    avail = budget - fixed_spend

    cal = np.flatnonzero(calibrated)
    weight = n_s[cal] / n_total
    cost = p_s[cal] / p_total
    raw_curves = [curve(s[members[i]], pur[members[i]], rob[members[i]]) for i in cal]
    mins = [min_fpr_for_coverage(c, required[i]) for c, i in zip(raw_curves, cal, strict=True)]
    lo = np.array([m[0] for m in mins])
    for (_, reachable), i in zip(mins, cal.tolist(), strict=True):
        if not reachable:
            warnings.append(f"slice {str(names[i])!r}: coverage {required[i]} unreachable")
    for k in np.flatnonzero(lo > max_slice_fpr).tolist():
        warnings.append(
            f"slice {str(names[cal[k]])!r}: coverage {required[cal[k]]} needs FPR {lo[k]:.4f}, "
            f"over the slice cap {max_slice_fpr}: capped"
        )
    lo = np.minimum(lo, max_slice_fpr)

    floor_spend = float(cost @ lo) if cal.size else 0.0
    if floor_spend > avail + _TOL:
        culprits = ", ".join(
            f"{names[i]} (f_min={f:.4f}, {c:.1%} of purchasing clicks)"
            for i, f, c in sorted(zip(cal, lo, cost, strict=True), key=lambda t: -t[1] * t[2])
            if f > 0
        )
        raise CalibrationError(
            f"coverage minima need FPR {floor_spend:.4f} but the budget leaves {avail:.4f} "
            f"(budget {budget}, global-threshold slices spend {fixed_spend:.4f}); "
            f"slices with minima: {culprits or 'none'}"
        )

    # The most FPR the budget could give each slice once every other slice sits at its min.
    feasible_hi = np.minimum(
        min(1.0, max_slice_fpr), lo + max(avail - floor_spend, 0.0) / np.maximum(cost, 1e-300)
    )
    hi = feasible_hi if fit_span is None else np.minimum(feasible_hi, lo + fit_span * budget)

    sc = [
        SliceCurve.from_curve(
            str(names[i]), raw_curves[k], float(required[i]), mins[k], (lo[k], hi[k])
        )
        for k, i in enumerate(cal)
    ]
    curves = {c.name: c for c in sc}
    hulls = [(c.hull_fpr, c.hull_ivr) for c in sc]

    # The exact optimum on the hulls: the empirical method's answer and the yardstick.
    f_hull_opt = _allocate_on_hulls(hulls, weight, cost, lo, feasible_hi, avail)
    if method == "empirical":
        f_chosen, status, solver = f_hull_opt, "optimal", "greedy-hull"
    else:
        b = np.array([c.coefficients[1] for c in sc])
        cc = np.array([c.coefficients[2] for c in sc])
        f_chosen, status, solver = _solve_quadratic(weight, b, cc, cost, lo, hi, avail)
        f_chosen = np.clip(f_chosen, lo, hi)
    f_chosen = _repair_budget(f_chosen, cost, lo, avail)

    # Thresholds: the score giving f_s on the slice's own clicks.
    thresholds: dict[str, float] = {}
    for k, i in enumerate(cal.tolist()):
        m = members[i]
        thresholds[str(names[i])] = threshold_for_fpr(s[m], pur[m], float(f_chosen[k]))
    for i, (t, _) in fallback.items():
        thresholds[str(names[i])] = t

    invalid = apply_thresholds(s, slices, thresholds, global_t)
    realised = compute_metrics(invalid, pur, rob, slices)
    rows: dict[str, SliceCalibration] = {}
    small_ivr = 0.0  # weighted realised IVR of the uncalibrated slices
    for i, name in enumerate(names.tolist()):
        got = realised["slices"][name]
        if calibrated[i]:
            k = int(np.searchsorted(cal, i))
            c = curves[name]
            f = float(f_chosen[k])
            model = c.ivr_hull(f) if method == "empirical" else c.ivr_fit(f)
            rows[name] = SliceCalibration(
                name=name,
                n=int(n_s[i]),
                p=int(p_s[i]),
                robotic=c.r,
                calibrated=True,
                min_coverage=float(required[i]),
                f_min=c.f_min,
                coverage_reachable=c.coverage_reachable,
                fpr_target=f,
                threshold=thresholds[name],
                predicted_ivr=float(model),
                coefficients=c.coefficients,
                fit_range=c.fit_range,
                ivr=got["ivr"],
                fpr=got["fpr"],
                coverage=got["coverage"],
            )
        else:
            small_ivr += got["invalid_clicks"] / n_total
            rows[name] = SliceCalibration(
                name=name,
                n=int(n_s[i]),
                p=int(p_s[i]),
                robotic=got["robotic_clicks"],
                calibrated=False,
                min_coverage=float(required[i]),
                f_min=None,
                coverage_reachable=True,
                fpr_target=None,
                threshold=fallback[i][0],
                predicted_ivr=None,
                coefficients=None,
                fit_range=None,
                ivr=got["ivr"],
                fpr=got["fpr"],
                coverage=got["coverage"],
                note=fallback[i][1],
            )

    def on_hulls(f: np.ndarray) -> float:
        return small_ivr + sum(
            float(w * c.ivr_hull(x)) for w, c, x in zip(weight, sc, f, strict=True)
        )

    if method == "empirical":
        predicted = on_hulls(f_chosen)
    else:
        predicted = small_ivr + sum(
            float(w * c.ivr_fit(x)) for w, c, x in zip(weight, sc, f_chosen, strict=True)
        )
    hull_value, hull_optimum = on_hulls(f_chosen), on_hulls(f_hull_opt)
    objective = {
        "predicted": predicted,
        "hull": hull_value,
        "hull_optimum": hull_optimum,
        "approximation_loss": max(hull_optimum - hull_value, 0.0),
        "realised": float(realised["overall"]["ivr"] or 0.0),
    }
    for w in warnings:
        log.warning("calibration: %s", w)
    return CalibrationResult(
        method=method,
        budget=float(budget),
        thresholds=thresholds,
        default_threshold=global_t,
        slices=rows,
        status=status,
        solver=solver,
        ivr=realised["overall"]["ivr"],
        fpr=realised["overall"]["fpr"],
        coverage=realised["overall"]["coverage"],
        objective=objective,
        warnings=warnings,
        curves=curves,
    )


def _solve_quadratic(
    weight: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    cost: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    avail: float,
) -> tuple[np.ndarray, str, str]:
    """The concave QP by cvxpy, or by water-filling when cvxpy is missing or fails."""
    if weight.size == 0:
        return np.zeros(0), "optimal", "none"
    hi = np.maximum(hi, lo)
    try:
        f, status = _solve_qp_cvxpy(weight, b, c, cost, lo, hi, avail)
        return f, status, "CLARABEL"
    except Exception as exc:  # noqa: BLE001 - any solver failure falls back to KKT
        log.warning("calibration: cvxpy failed (%s); solving by water-filling", exc)
        return _water_fill(weight, b, c, cost, lo, hi, avail), "optimal", "water-filling"


# --------------------------------------------------------------------------------------
# Comparison with one global threshold
# --------------------------------------------------------------------------------------


def compare_with_global(
    result: CalibrationResult,
    scores: npt.ArrayLike,
    slices: npt.ArrayLike,
    purchasing: npt.ArrayLike,
    robotic: npt.ArrayLike,
) -> dict[str, Any]:
    """Slice thresholds against one global threshold at the same realised overall FPR.

    The slice thresholds are applied to the clicks; the overall FPR they realise is then
    given to a single threshold (:func:`global_threshold_at_fpr`), so both spend the same
    budget. Returns, JSON-ready::

        {"overall_fpr": f,
         "slice_thresholds": {"ivr", "fpr", "coverage"},
         "global_threshold": {"threshold", "ivr", "fpr", "coverage"},
         "ivr_gain": slice IVR - global IVR,
         "slices": {name: {"min_coverage", "slice_threshold", "slice_ivr", "slice_fpr",
                           "slice_coverage", "slice_meets_min", "global_ivr", "global_fpr",
                           "global_coverage", "global_meets_min"}},
         "min_coverage_met": {"slice_thresholds": bool, "global_threshold": bool}}

    A slice without robotic clicks meets any minimum (there is nothing to cover).
    """
    s = np.asarray(scores, dtype=float)
    pur = np.asarray(purchasing, dtype=bool)
    rob = np.asarray(robotic, dtype=bool)
    ours = compute_metrics(
        apply_thresholds(s, slices, result.thresholds, result.default_threshold), pur, rob, slices
    )
    overall_fpr = ours["overall"]["fpr"] or 0.0
    global_t = global_threshold_at_fpr(s, pur, overall_fpr)
    theirs = compute_metrics(s >= global_t, pur, rob, slices)

    def meets(coverage: float | None, needed: float) -> bool:
        return needed <= 0 or coverage is None or coverage >= needed - _TOL

    per_slice: dict[str, Any] = {}
    for name, mine in ours["slices"].items():
        other = theirs["slices"][name]
        row = result.slices.get(name)
        needed = row.min_coverage if row is not None else 0.0
        per_slice[name] = {
            "min_coverage": needed,
            "slice_threshold": result.threshold_for(name),
            "slice_ivr": mine["ivr"],
            "slice_fpr": mine["fpr"],
            "slice_coverage": mine["coverage"],
            "slice_meets_min": meets(mine["coverage"], needed),
            "global_ivr": other["ivr"],
            "global_fpr": other["fpr"],
            "global_coverage": other["coverage"],
            "global_meets_min": meets(other["coverage"], needed),
        }
    ours_ivr = ours["overall"]["ivr"]
    theirs_ivr = theirs["overall"]["ivr"]
    return {
        "overall_fpr": overall_fpr,
        "slice_thresholds": {k: ours["overall"][k] for k in ("ivr", "fpr", "coverage")},
        "global_threshold": {
            "threshold": global_t,
            **{k: theirs["overall"][k] for k in ("ivr", "fpr", "coverage")},
        },
        "ivr_gain": None if ours_ivr is None or theirs_ivr is None else ours_ivr - theirs_ivr,
        "slices": per_slice,
        "min_coverage_met": {
            "slice_thresholds": all(r["slice_meets_min"] for r in per_slice.values()),
            "global_threshold": all(r["global_meets_min"] for r in per_slice.values()),
        },
    }
