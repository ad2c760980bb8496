"""Strong peers for comparison: gradient-boosted trees and a one-hot logistic regression.

slidr's model is measured against them on the same features and labels (STYLE 11).
``y = 1`` means robot, as ``models.labels.Labels.robot``; every ``predict`` returns
P(y = 1). LightGBM is an optional dependency (the ``dev`` extra): ``lightgbm_available``
says whether it can be used, and ``fit_lightgbm`` raises ``PeerUnavailable`` without it.
The logistic regression needs only numpy and scipy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from events.errors import SlidrError

# LightGBM settings for click fraud: small trees, a moderate rate and early stopping,
# two threads (the CI machines have two cores) and deterministic results for a seed.
LIGHTGBM_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "metric": "auc",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "max_depth": -1,
    "min_child_samples": 50,
    "min_data_per_group": 50,
    "cat_smooth": 10.0,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.9,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 255,
    "n_jobs": 2,
    "deterministic": True,
    "force_row_wise": True,
    "verbose": -1,
}
MAX_ROUNDS = 1000
EARLY_STOPPING_ROUNDS = 50

# Id columns by name: one 1-D array (or sequence) of values per column, one value a row.
IdColumns = Mapping[str, np.ndarray | Sequence[Any]]


class PeerUnavailable(SlidrError, RuntimeError):
    """A peer's library is not installed (``pip install -e '.[dev]'`` brings it)."""


def lightgbm_available() -> bool:
    """True when LightGBM can be imported."""
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        return False
    return True


def fit_lightgbm(
    x_train: npt.ArrayLike,
    y_train: npt.ArrayLike,
    w_train: npt.ArrayLike | None,
    x_val: npt.ArrayLike,
    y_val: npt.ArrayLike,
    w_val: npt.ArrayLike | None,
    feature_names: Sequence[str],
    categorical: Sequence[str] = (),
    seed: int = 7,
) -> Any:
    """Gradient-boosted trees (a ``lightgbm.Booster``) fitted with early stopping on validation.

    ``x_*`` are 2-D float arrays with columns ``feature_names``; the columns named in
    ``categorical`` hold non-negative integer codes. Weights may be ``None`` (all 1).
    Stops after ``EARLY_STOPPING_ROUNDS`` rounds without a better validation AUC (or
    log loss when the validation labels have one class only).
    """
    if not lightgbm_available():
        raise PeerUnavailable("LightGBM is not installed (pip install lightgbm)")
    import lightgbm as lgb

    names = list(feature_names)
    unknown = sorted(set(categorical) - set(names))
    if unknown:
        raise ValueError(f"categorical features {unknown} are not among feature_names")
    y_val = np.asarray(y_val, dtype=np.float64)
    params = {**LIGHTGBM_PARAMS, "seed": seed}
    if len(np.unique(y_val)) < 2:
        params["metric"] = "binary_logloss"
    train = lgb.Dataset(
        np.asarray(x_train, dtype=np.float64),
        np.asarray(y_train, dtype=np.float64),
        weight=None if w_train is None else np.asarray(w_train, dtype=np.float64),
        feature_name=names,
        categorical_feature=list(categorical),
        free_raw_data=True,
    )
    valid = lgb.Dataset(
        np.asarray(x_val, dtype=np.float64),
        y_val,
        weight=None if w_val is None else np.asarray(w_val, dtype=np.float64),
        reference=train,
    )
    return lgb.train(
        params,
        train,
        num_boost_round=MAX_ROUNDS,
        valid_sets=[valid],
        valid_names=["validation"],
        callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, verbose=False)],
    )


def predict_lightgbm(model: Any, x: npt.ArrayLike) -> np.ndarray:
    """P(y = 1) per row of ``x``, with the trees up to the best validation round."""
    best = getattr(model, "best_iteration", 0) or None
    # verbose=-1: else every call warns of sparse categorical codes (slidr's hashed ids).
    x = np.asarray(x, dtype=np.float64)
    return np.asarray(model.predict(x, num_iteration=best, verbose=-1))


# --- one-hot logistic regression ----------------------------------------------------------


@dataclass
class OneHotLogistic:
    """L2-regularised logistic regression on one-hot categorical values.

    ``vocabulary[name]`` maps each value of column ``name`` seen often enough in training
    to its weight's index; a value it does not hold contributes nothing.
    """

    columns: list[str]
    vocabulary: dict[str, dict[str, int]]
    coef: np.ndarray
    intercept: float

    @property
    def n_features(self) -> int:
        return len(self.coef)

    def design(self, data: IdColumns) -> Any:
        """The sparse one-hot matrix (CSR, rows x ``n_features``) of ``data``."""
        return _one_hot(data, self.columns, self.vocabulary, self.n_features)

    def predict(self, data: IdColumns) -> np.ndarray:
        """P(y = 1) per row; ``data`` maps each of ``columns`` to an array of values."""
        return _sigmoid(self.design(data) @ self.coef + self.intercept)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


def _as_strings(values: npt.ArrayLike) -> np.ndarray:
    return np.asarray([None if v is None else str(v) for v in np.asarray(values, dtype=object)])


def _one_hot(
    data: IdColumns,
    columns: list[str],
    vocabulary: dict[str, dict[str, int]],
    width: int,
) -> Any:
    from scipy import sparse

    missing = [c for c in columns if c not in data]
    if missing:
        raise ValueError(f"columns {missing} are missing")
    n = len(data[columns[0]]) if columns else 0
    rows, cols = [], []
    for name in columns:
        index = vocabulary[name]
        codes = np.fromiter(
            (index.get(v, -1) for v in _as_strings(data[name])), dtype=np.int64, count=n
        )
        hit = codes >= 0
        rows.append(np.nonzero(hit)[0])
        cols.append(codes[hit])
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(n, width))


def one_hot_logistic(
    data: IdColumns,
    y: npt.ArrayLike,
    w: npt.ArrayLike | None = None,
    l2: float = 1.0,
    min_count: int = 1,
    max_iter: int = 500,
) -> OneHotLogistic:
    """Fit a logistic regression on the one-hot values of every column of ``data``.

    Minimises sum_i w_i logloss_i + l2/2 |coef|^2 (the intercept is not penalised) with
    L-BFGS, weights rescaled to mean 1. Values seen fewer than ``min_count`` times in
    training get no weight of their own.
    """
    from scipy import optimize

    columns = list(data)
    y = np.asarray(y, dtype=np.float64)
    weights = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    weights = weights / max(weights.mean(), 1e-300)
    vocabulary: dict[str, dict[str, int]] = {}
    width = 0
    for name in columns:
        values, counts = np.unique(
            [v for v in _as_strings(data[name]) if v is not None], return_counts=True
        )
        kept = values[counts >= min_count]
        vocabulary[name] = {str(v): width + i for i, v in enumerate(kept)}
        width += len(kept)
    x = _one_hot(data, columns, vocabulary, width)
    xt = x.T.tocsr()

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        coef, intercept = params[:-1], params[-1]
        z = x @ coef + intercept
        value = float(np.sum(weights * (np.logaddexp(0.0, z) - y * z))) + 0.5 * l2 * coef @ coef
        residual = weights * (_sigmoid(z) - y)
        grad = np.empty_like(params)
        grad[:-1] = xt @ residual + l2 * coef
        grad[-1] = residual.sum()
        return value, grad

    prior = np.clip(np.average(y, weights=weights), 1e-6, 1 - 1e-6)
    start = np.zeros(width + 1)
    start[-1] = np.log(prior / (1 - prior))
    result = optimize.minimize(
        loss, start, jac=True, method="L-BFGS-B", options={"maxiter": max_iter}
    )
    return OneHotLogistic(columns, vocabulary, result.x[:-1].copy(), float(result.x[-1]))
