"""Evaluation metrics from the SLIDR paper (SPEC §3), overall and per traffic slice.

A click is *invalidated* when the model flags it (``score >= threshold``). With ``n`` clicks,
``P`` purchasing clicks and ``R`` robotic clicks:

- **IVR** (invalidation rate) = invalidated clicks / n.
- **FPR** = invalidated purchasing clicks / P. Clicks that led to a purchase stand in for
  human clicks, since real traffic has no ground truth.
- **Robotic coverage** = invalidated robotic clicks / R, where a click is *robotic* when its
  session made more than k ad clicks within an hour (:func:`robotic_sessions`).
- With ground truth (simulated data only): bot recall = invalidated bots / bots, human FPR
  = invalidated humans / humans, precision = invalidated bots / invalidated clicks.

A ratio whose denominator is 0 is undefined: it is ``None`` in the JSON figures of
:func:`compute_metrics` and NaN in the numeric arrays of :func:`curve`.

Everything here is vectorised numpy over whole arrays (one entry per click) and does no I/O,
so the training job, the report and the tests drive it directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

HOUR_S = 3_600
DEFAULT_ROBOTIC_K = 10


# --------------------------------------------------------------------------------------
# Robotic sessions
# --------------------------------------------------------------------------------------


def robotic_sessions(
    session_id: npt.ArrayLike, ts: npt.ArrayLike, k: int = DEFAULT_ROBOTIC_K
) -> np.ndarray:
    """Per click, whether its session made more than ``k`` ad clicks within an hour.

    "Within an hour" is read as one *clock hour*: the tumbling bucket ``floor(ts / 3600)``
    aligned to the epoch, the same 1 h window the features use. A session is robotic when
    any single clock hour holds more than ``k`` of its clicks, and then *all* its clicks are
    flagged (the session, not the burst, is what the paper calls robotic). A burst that
    straddles an hour boundary can therefore escape where a sliding window would catch it;
    we accept that for a definition that is deterministic, cheap and replayable.

    Args:
        session_id: session of each click (any values comparable as strings).
        ts: event time of each click, epoch seconds.
        k: clicks per clock hour that a session may make and still count as human.

    Returns:
        Boolean array, one entry per click.
    """
    sessions = np.asarray(session_id).astype(str)
    hours = np.floor(np.asarray(ts, dtype=float) / HOUR_S).astype(np.int64)
    if sessions.shape != hours.shape:
        raise ValueError("session_id and ts must have the same length")
    if sessions.size == 0:
        return np.zeros(0, dtype=bool)

    _, session_code = np.unique(sessions, return_inverse=True)
    session_code = session_code.ravel()
    # Sort by (session, hour) so that each (session, hour) cell is one contiguous run.
    order = np.lexsort((hours, session_code))
    s_sorted, h_sorted = session_code[order], hours[order]
    starts = np.flatnonzero(
        np.r_[True, (s_sorted[1:] != s_sorted[:-1]) | (h_sorted[1:] != h_sorted[:-1])]
    )
    run_lengths = np.diff(np.r_[starts, s_sorted.size])
    robotic_codes = np.unique(s_sorted[starts[run_lengths > k]])
    return np.isin(session_code, robotic_codes)


# --------------------------------------------------------------------------------------
# Slices
# --------------------------------------------------------------------------------------


def split_slices(slices: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Distinct slice names (sorted, as ``str``) and each click's index into them.

    Slices are compared as strings, so ``None`` becomes the slice ``"None"``.
    """
    names, codes = np.unique(np.asarray(slices).astype(str), return_inverse=True)
    return names, codes.ravel()


# --------------------------------------------------------------------------------------
# Figures at one decision
# --------------------------------------------------------------------------------------


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _figures(counts: dict[str, int], with_truth: bool) -> dict[str, Any]:
    """SPEC §3 figures from the counts of one group of clicks (JSON-ready)."""
    c = counts
    out: dict[str, Any] = {
        "clicks": c["n"],
        "invalid_clicks": c["inv"],
        "purchasing_clicks": c["p"],
        "robotic_clicks": c["r"],
        "ivr": _ratio(c["inv"], c["n"]),
        "fpr": _ratio(c["inv_p"], c["p"]),
        "coverage": _ratio(c["inv_r"], c["r"]),
    }
    if with_truth:
        humans = c["n"] - c["bot"]
        out.update(
            {
                "bot_clicks": c["bot"],
                "bot_recall": _ratio(c["inv_bot"], c["bot"]),
                "human_fpr": _ratio(c["inv"] - c["inv_bot"], humans),
                "precision": _ratio(c["inv_bot"], c["inv"]),
            }
        )
    return out


def compute_metrics(
    invalid: npt.ArrayLike,
    purchasing: npt.ArrayLike,
    robotic: npt.ArrayLike,
    slices: npt.ArrayLike | None,
    is_bot: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """SPEC §3 metrics of a set of verdicts, overall and per slice.

    Args:
        invalid: per click, whether it was invalidated.
        purchasing: per click, whether it led to a purchase (stands in for human).
        robotic: per click, whether its session is robotic (see :func:`robotic_sessions`).
        slices: per click, its slice name (e.g. ``desktop/logged_in``); ``None`` for no
            per-slice breakdown.
        is_bot: ground truth (simulated data only); adds bot recall, human FPR, precision.

    Returns:
        ``{"overall": figures, "slices": {name: figures}}`` where figures holds the counts
        ``clicks``, ``invalid_clicks``, ``purchasing_clicks``, ``robotic_clicks`` (and
        ``bot_clicks``) as ints and the ratios ``ivr``, ``fpr``, ``coverage`` (and
        ``bot_recall``, ``human_fpr``, ``precision``) as floats, or ``None`` when their
        denominator is 0. Plain Python types only, so the dict is JSON-serialisable.
    """
    inv = np.asarray(invalid, dtype=bool)
    pur = np.asarray(purchasing, dtype=bool)
    rob = np.asarray(robotic, dtype=bool)
    bot = None if is_bot is None else np.asarray(is_bot, dtype=bool)
    n = inv.size
    for name, arr in (("purchasing", pur), ("robotic", rob), ("is_bot", bot)):
        if arr is not None and arr.shape != inv.shape:
            raise ValueError(f"{name} must have the same length as invalid")

    # One column per count; a per-slice count is then one bincount of the column.
    columns: dict[str, np.ndarray] = {
        "n": np.ones(n, dtype=bool),
        "inv": inv,
        "p": pur,
        "r": rob,
        "inv_p": inv & pur,
        "inv_r": inv & rob,
    }
    if bot is not None:
        columns["bot"] = bot
        columns["inv_bot"] = inv & bot
    with_truth = bot is not None

    overall = {key: int(col.sum()) for key, col in columns.items()}
    result: dict[str, Any] = {"overall": _figures(overall, with_truth), "slices": {}}
    if slices is None:
        return result

    names, codes = split_slices(slices)
    if codes.shape != inv.shape:
        raise ValueError("slices must have the same length as invalid")
    per_slice = {
        key: np.bincount(codes, weights=col, minlength=names.size).astype(np.int64)
        for key, col in columns.items()
    }
    for i, name in enumerate(names):
        counts = {key: int(vals[i]) for key, vals in per_slice.items()}
        result["slices"][str(name)] = _figures(counts, with_truth)
    return result


# --------------------------------------------------------------------------------------
# Threshold sweeps
# --------------------------------------------------------------------------------------


def _nan_ratio(num: np.ndarray, den: float) -> np.ndarray:
    if den > 0:
        return num / float(den)
    return np.full(num.shape, np.nan)


@dataclass(frozen=True)
class Curve:
    """Metrics as the threshold sweeps, one entry per threshold, sorted by FPR ascending.

    Points are ordered by threshold *descending*, which makes FPR, IVR, coverage and bot
    recall all non-decreasing along the arrays. Ratios with a zero denominator are NaN.
    """

    threshold: np.ndarray
    invalid: np.ndarray  # invalidated clicks at each threshold
    invalid_purchasing: np.ndarray
    invalid_robotic: np.ndarray
    ivr: np.ndarray
    fpr: np.ndarray
    coverage: np.ndarray
    n: int  # clicks
    p: int  # purchasing clicks
    r: int  # robotic clicks
    bot_recall: np.ndarray | None = None
    human_fpr: np.ndarray | None = None
    precision: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.threshold.size)

    def to_dict(self) -> dict[str, Any]:
        """Lists of plain floats (NaN as ``None``), for JSON plots."""

        def clean(a: np.ndarray | None) -> list[float | None] | None:
            if a is None:
                return None
            return [None if math.isnan(v) else float(v) for v in a.tolist()]

        return {
            "n": self.n,
            "p": self.p,
            "r": self.r,
            "threshold": clean(self.threshold),
            "ivr": clean(self.ivr),
            "fpr": clean(self.fpr),
            "coverage": clean(self.coverage),
            "bot_recall": clean(self.bot_recall),
            "human_fpr": clean(self.human_fpr),
            "precision": clean(self.precision),
        }


def curve(
    scores: npt.ArrayLike,
    purchasing: npt.ArrayLike,
    robotic: npt.ArrayLike,
    is_bot: npt.ArrayLike | None = None,
    grid: npt.ArrayLike | None = None,
) -> Curve:
    """IVR, FPR and robotic coverage (and truth metrics) for every threshold.

    A click is invalidated at threshold ``t`` when ``score >= t``. Without ``grid`` the
    thresholds are every distinct score plus one just above the maximum (nothing
    invalidated), so the curve holds every decision a threshold can make on these clicks.
    With ``grid`` it is evaluated at those thresholds only (duplicates dropped).

    Cost is one sort plus cumulative sums: the clicks invalidated at ``t`` are a prefix of
    the clicks sorted by score descending, so each count is a cumsum read at that prefix's
    length.
    """
    s = np.asarray(scores, dtype=float)
    pur = np.asarray(purchasing, dtype=bool)
    rob = np.asarray(robotic, dtype=bool)
    bot = None if is_bot is None else np.asarray(is_bot, dtype=bool)
    if pur.shape != s.shape or rob.shape != s.shape or (bot is not None and bot.shape != s.shape):
        raise ValueError("scores, purchasing, robotic (and is_bot) must have the same length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")

    order = np.argsort(-s, kind="stable")
    ascending = s[order][::-1]
    thresholds: np.ndarray
    if grid is None:
        distinct = np.unique(s)[::-1]
        top = np.nextafter(distinct[0], np.inf) if s.size else np.inf
        thresholds = np.r_[top, distinct]
    else:
        thresholds = np.unique(np.asarray(grid, dtype=float))[::-1]
    # Number of clicks with score >= t, for each threshold (the length of the prefix).
    k = s.size - np.searchsorted(ascending, thresholds, side="left")

    def flagged(mask: np.ndarray) -> np.ndarray:
        return np.r_[0, np.cumsum(mask[order], dtype=np.int64)][k]

    inv_p, inv_r = flagged(pur), flagged(rob)
    n, p, r = int(s.size), int(pur.sum()), int(rob.sum())
    truth: dict[str, np.ndarray | None] = {"bot_recall": None, "human_fpr": None, "precision": None}
    if bot is not None:
        inv_bot = flagged(bot)
        bots = int(bot.sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(k > 0, inv_bot / np.maximum(k, 1), np.nan)
        truth = {
            "bot_recall": _nan_ratio(inv_bot, bots),
            "human_fpr": _nan_ratio(k - inv_bot, n - bots),
            "precision": precision,
        }
    return Curve(
        threshold=thresholds,
        invalid=k,
        invalid_purchasing=inv_p,
        invalid_robotic=inv_r,
        ivr=_nan_ratio(k, n),
        fpr=_nan_ratio(inv_p, p),
        coverage=_nan_ratio(inv_r, r),
        n=n,
        p=p,
        r=r,
        **truth,
    )


def allowed_count(f: float, total: int) -> int:
    """Most clicks out of ``total`` that a rate ``f`` allows: floor(f * total).

    A relative tolerance absorbs float error, so that e.g. f = 3/10 allows 3 out of 10.
    """
    return int(math.floor(f * total * (1 + 1e-12) + 1e-9))


def threshold_for_fpr(scores: npt.ArrayLike, purchasing: npt.ArrayLike, f: float) -> float:
    """Smallest threshold whose FPR among purchasing clicks is at most ``f``.

    With P purchasing clicks the threshold may invalidate at most m = floor(f * P) of them.
    Sorting their scores descending, q_1 >= q_2 >= ..., it must lie strictly above
    q_(m+1); the smallest such float is ``nextafter(q_(m+1), +inf)``, which invalidates
    every click scoring strictly above q_(m+1) and so gives the most IVR allowed.

    Ties: a threshold invalidates all clicks of a given score or none, so when q_m equals
    q_(m+1) the whole tie stays valid and the realised FPR is below ``f``: the FPR is
    never exceeded. When m >= P every click may be invalidated and the threshold is the
    lowest score.

    Raises:
        ValueError: no purchasing clicks (the FPR is undefined), or no clicks at all.
    """
    s = np.asarray(scores, dtype=float)
    pur = np.asarray(purchasing, dtype=bool)
    if s.size == 0:
        raise ValueError("no clicks")
    q = np.sort(s[pur])[::-1]
    if q.size == 0:
        raise ValueError("no purchasing clicks: the FPR is undefined")
    m = allowed_count(f, q.size)
    if m >= q.size:
        return float(s.min())
    return float(np.nextafter(q[max(m, 0)], np.inf))


def ivr_at_fpr(scores: npt.ArrayLike, purchasing: npt.ArrayLike, f: float) -> float:
    """IVR of the threshold :func:`threshold_for_fpr` picks for FPR ``f``."""
    s = np.asarray(scores, dtype=float)
    return float(np.mean(s >= threshold_for_fpr(s, purchasing, f)))


def recall_at_human_fpr(
    scores: npt.ArrayLike, is_bot: npt.ArrayLike, target: float = 0.01
) -> float | None:
    """Bot recall at the threshold chosen on true humans so that their FPR is <= target.

    Ground truth only (simulated data). ``None`` when there are no bots.
    """
    s = np.asarray(scores, dtype=float)
    bot = np.asarray(is_bot, dtype=bool)
    if not bot.any():
        return None
    t = threshold_for_fpr(s, ~bot, target)
    return float(np.mean(s[bot] >= t))


def recall_by_kind(
    scores: npt.ArrayLike, is_bot: npt.ArrayLike, kind: npt.ArrayLike, target: float = 0.01
) -> dict[str, dict[str, Any]]:
    """Per robot kind: its clicks and the share of them at or above the threshold that
    invalidates ``target`` of the true humans (the one threshold of ``recall_at_human_fpr``
    for every kind). Ground truth only; ``{}`` without bots.

    Why: one recall hides which robots a model misses. On ``slidr simulate --world
    proxy_lies`` two models with the same overall recall can miss different kinds: the
    velocity robots, or the ones recognised only by the ads and publishers they target.
    """
    s = np.asarray(scores, dtype=float)
    bot = np.asarray(is_bot, dtype=bool)
    kinds = np.asarray(kind).astype(str)
    if not bot.any():
        return {}
    t = threshold_for_fpr(s, ~bot, target)
    out: dict[str, dict[str, Any]] = {}
    for k in np.unique(kinds[bot]).tolist():
        rows = bot & (kinds == k)
        out[k] = {"bots": int(rows.sum()), "recall": float(np.mean(s[rows] >= t))}
    return out


def auc(scores: npt.ArrayLike, positive: npt.ArrayLike) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (ties count one half);
    ``None`` when either class is empty."""
    s = np.asarray(scores, dtype=float)
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def weighted_auc(
    scores: npt.ArrayLike, positive: npt.ArrayLike, weights: npt.ArrayLike
) -> float | None:
    """AUC of ``scores`` for ``positive`` with each click counting its weight (ties count
    one half): the probability that a weighted positive outscores a weighted negative.
    ``None`` when either class has no weight."""
    s = np.asarray(scores, dtype=float)
    pos = np.asarray(positive, dtype=bool)
    w = np.asarray(weights, dtype=float)
    _, group = np.unique(s, return_inverse=True)  # groups of equal scores, ascending
    w_pos = np.bincount(group, weights=w * pos)
    w_neg = np.bincount(group, weights=w * ~pos)
    if w_pos.sum() <= 0 or w_neg.sum() <= 0:
        return None
    return _grouped_auc(w_pos, w_neg)


def _grouped_auc(w_pos: np.ndarray, w_neg: np.ndarray) -> float:
    """AUC from the positive and negative weight at each score, scores ascending (ties
    count one half); both classes must have weight."""
    below = np.cumsum(w_neg) - w_neg
    return float((w_pos * (below + 0.5 * w_neg)).sum() / (w_pos.sum() * w_neg.sum()))


def bootstrap_aucs(
    scores: Mapping[str, npt.ArrayLike],
    positive: npt.ArrayLike,
    rounds: int = 2_000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The AUC of each model's ``scores`` for ``positive`` on ``rounds`` bootstrap
    resamples of the clicks: positives and negatives are each drawn with replacement to
    their own count (so every resample has both classes), and every model is scored on
    the same resamples, so that differences between models are paired.

    Why: with a few dozen positives an AUC moves by about 0.01 from the draw of clicks
    alone (83 downloads on the TalkingData sample's test day); an interval on a
    difference says whether two models can be told apart at all.
    """
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("bootstrap_aucs needs both classes")
    rng = np.random.default_rng(seed)
    pos_rows, neg_rows = np.flatnonzero(pos), np.flatnonzero(~pos)
    groups = {}
    for name, s in scores.items():
        values = np.asarray(s, dtype=float)
        if values.shape != pos.shape:
            raise ValueError(f"{name}: {values.shape[0]} scores for {pos.shape[0]} clicks")
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: scores must be finite")
        _, group = np.unique(values, return_inverse=True)  # equal scores, ascending
        groups[name] = (group[pos_rows], group[neg_rows], int(group.max()) + 1)
    out = {name: np.empty(rounds) for name in scores}
    for r in range(rounds):
        # How often each click is drawn: one multinomial per class.
        w_pos = np.bincount(rng.integers(0, n_pos, n_pos), minlength=n_pos).astype(float)
        w_neg = np.bincount(rng.integers(0, n_neg, n_neg), minlength=n_neg).astype(float)
        for name, (g_pos, g_neg, size) in groups.items():
            at_pos = np.bincount(g_pos, weights=w_pos, minlength=size)
            at_neg = np.bincount(g_neg, weights=w_neg, minlength=size)
            out[name][r] = _grouped_auc(at_pos, at_neg)
    return out


def percentile_interval(values: npt.ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap ``values`` (percentile method)."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(np.asarray(values, dtype=float), [tail, 100.0 - tail])
    return float(lo), float(hi)
