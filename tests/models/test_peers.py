"""The peers learn a planted signal: gradient-boosted trees and one-hot logistic regression."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics import auc
from models.peers import (
    OneHotLogistic,
    fit_lightgbm,
    lightgbm_available,
    one_hot_logistic,
    predict_lightgbm,
)


def planted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two numeric features and one categorical code; robots (y = 1) sit where the signal is."""
    rng = np.random.default_rng(seed)
    code = rng.integers(0, 20, size=n)
    velocity = rng.exponential(1.0, size=n)
    noise = rng.normal(size=n)
    logit = 2.5 * (velocity - 1.0) + np.where(code < 5, 2.5, -1.0)
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    return np.column_stack([velocity, noise, code]).astype(np.float64), y


@pytest.mark.skipif(not lightgbm_available(), reason="LightGBM not installed (dev extra)")
def test_lightgbm_learns_planted_signal() -> None:
    x, y = planted(6_000, seed=1)
    xv, yv = planted(2_000, seed=2)
    xt, yt = planted(2_000, seed=3)
    names = ["velocity", "noise", "code"]
    model = fit_lightgbm(x, y, None, xv, yv, None, names, categorical=["code"], seed=7)
    p = predict_lightgbm(model, xt)
    assert p.shape == (len(yt),) and np.all((p >= 0) & (p <= 1))
    assert auc(p, yt) > 0.9
    # Deterministic for a seed; weights are accepted.
    again = fit_lightgbm(x, y, None, xv, yv, None, names, categorical=["code"], seed=7)
    np.testing.assert_array_equal(predict_lightgbm(again, xt), p)
    weighted = fit_lightgbm(x, y, np.where(y == 1, 0.5, 2.0), xv, yv, np.ones(len(yv)), names)
    assert auc(predict_lightgbm(weighted, xt), yt) > 0.9


@pytest.mark.skipif(not lightgbm_available(), reason="LightGBM not installed (dev extra)")
def test_lightgbm_rejects_unknown_categorical() -> None:
    x, y = planted(200, seed=1)
    with pytest.raises(ValueError, match="speed"):
        fit_lightgbm(x, y, None, x, y, None, ["a", "b", "c"], categorical=["speed"])


def test_one_hot_logistic_learns_planted_ids() -> None:
    rng = np.random.default_rng(5)
    n = 8_000
    app = rng.integers(0, 30, size=n).astype(str)
    channel = rng.integers(0, 50, size=n)
    # Robots come from a few apps, whatever the channel.
    bad = np.isin(app, ["3", "7", "11", "19"])
    y = (rng.random(n) < np.where(bad, 0.98, 0.02)).astype(float)
    train = slice(0, 6_000)
    test = slice(6_000, n)
    model = one_hot_logistic({"app": app[train], "channel": channel[train]}, y[train], l2=1.0)
    assert isinstance(model, OneHotLogistic)
    assert model.n_features == 30 + 50
    p = model.predict({"app": app[test], "channel": channel[test]})
    assert auc(p, y[test]) > 0.9
    assert auc(p, bad[test]) > 0.99
    # An unseen value gets no weight of its own: the intercept alone.
    unseen = model.predict({"app": np.array(["new"]), "channel": np.array([999])})
    assert unseen[0] == pytest.approx(1 / (1 + np.exp(-model.intercept)))


def test_one_hot_logistic_min_count_and_weights() -> None:
    app = np.array(["a"] * 50 + ["b"] * 50 + ["rare"])
    y = np.array([1.0] * 50 + [0.0] * 50 + [1.0])
    model = one_hot_logistic({"app": app}, y, min_count=2)
    assert set(model.vocabulary["app"]) == {"a", "b"}
    p = model.predict({"app": np.array(["a", "b"])})
    assert p[0] > 0.9 and p[1] < 0.1
    # Weighting the "a" rows down moves the intercept, not the ranking.
    heavier = one_hot_logistic({"app": app}, y, w=np.where(app == "a", 0.1, 1.0))
    q = heavier.predict({"app": np.array(["a", "b"])})
    assert q[0] > q[1]
    with pytest.raises(ValueError, match="missing"):
        model.predict({"other": np.array(["a"])})
