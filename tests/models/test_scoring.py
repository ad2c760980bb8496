"""Scoring with ONNX Runtime: the scorer, the reason codes of an invalid verdict, the
verdict rule."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from features.definitions import INDEX, N_FEATURES
from models import scoring
from models.scoring import REASON_RULES, ModelFileError, OnnxScorer, decide, reason_codes
from models.testing import write_logistic_onnx

WEIGHTS = {"ua_crawler": 4.0, "u_clicks_1m": 1.5, "logged_in": -2.0}
BIAS = -3.0


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_logistic_onnx(tmp_path_factory.mktemp("scoring") / "m.onnx", WEIGHTS, BIAS)


def expected_scores(x: np.ndarray) -> np.ndarray:
    logit = BIAS + sum(w * x[:, INDEX[name]].astype(np.float64) for name, w in WEIGHTS.items())
    return 1.0 / (1.0 + np.exp(-logit))


def test_the_scorer_gives_the_model_s_probability_per_row(model_file: Path) -> None:
    scorer = OnnxScorer(model_file, prefer_gpu=False)
    assert scorer.provider == "CPUExecutionProvider"
    assert scorer.n_features == N_FEATURES and scorer.input_name == "features"
    x = np.random.default_rng(1).normal(size=(257, N_FEATURES)).astype(np.float32)
    scores = scorer.score(x)
    assert scores.dtype == np.float64 and scores.shape == (257,)
    np.testing.assert_allclose(scores, expected_scores(x), atol=1e-6)
    # Any float array, in any memory layout, gives the same scores.
    np.testing.assert_allclose(scorer.score(np.asfortranarray(x.astype(np.float64))), scores)
    np.testing.assert_allclose(scorer.score(x[::2]), scores[::2])
    assert scorer.score(x[:1]).shape == (1,)
    assert scorer.score(np.zeros((0, N_FEATURES), dtype=np.float32)).shape == (0,)


def test_a_missing_or_broken_model_file_names_its_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(ModelFileError, match="not found.*nowhere/model.onnx"):
        OnnxScorer(missing)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="broken.onnx cannot be loaded"):
        OnnxScorer(broken)
    with pytest.raises(ModelFileError, match="not found"):
        OnnxScorer(tmp_path)  # a directory is not a model file


def test_cuda_is_not_used_when_no_device_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    scoring.cuda_usable.cache_clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    try:
        assert scoring.cuda_usable() is False
    finally:
        scoring.cuda_usable.cache_clear()


def row(**values: float) -> np.ndarray:
    """A feature row with these raw values (counts given as counts, stored as log1p)."""
    x = np.zeros(N_FEATURES, dtype=np.float32)
    for name, value in values.items():
        logged = not name.startswith(("ua_", "browser_"))
        x[INDEX[name]] = math.log1p(value) if logged else value
    return x


def test_an_invalid_verdict_always_names_the_model_score_last() -> None:
    assert reason_codes(row()) == ["model_score"]
    assert reason_codes(row(ua_crawler=1.0, ip_clicks_1m=31)) == [
        "known_crawler_ua",
        "ip_velocity_1m",
        "model_score",
    ]


def is_flag(column: str) -> bool:
    return column.startswith(("ua_", "browser_"))


@pytest.mark.parametrize(("code", "column", "limit"), REASON_RULES)
def test_each_reason_fires_only_above_its_limit(code: str, column: str, limit: float) -> None:
    over = 1.0 if is_flag(column) else limit + 1
    assert reason_codes(row(**{column: over})) == [code, "model_score"]
    under = 0.0 if is_flag(column) else limit - 1
    assert reason_codes(row(**{column: under})) == ["model_score"]


def test_a_count_exactly_at_its_limit_gives_no_reason() -> None:
    fired = [
        code
        for code, column, limit in REASON_RULES
        if not is_flag(column) and code in reason_codes(row(**{column: limit}))
    ]
    assert fired == []


def test_every_reason_code_is_distinct_and_reads_an_existing_column() -> None:
    codes = [code for code, _, _ in REASON_RULES]
    assert len(set(codes)) == len(codes) and "model_score" not in codes
    assert all(column in INDEX for _, column, _ in REASON_RULES)


def test_a_score_at_its_threshold_is_invalid() -> None:
    scores = np.array([0.2, 0.5, 0.7, 0.9])
    thresholds = np.array([0.3, 0.5, 0.8, 0.1])
    assert decide(scores, thresholds).tolist() == [False, True, False, True]
