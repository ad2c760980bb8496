"""Target encoding of id buckets (models.encoding): what a bucket's rate says, and that a
training click's own label never reaches its own input."""

from __future__ import annotations

import numpy as np
import pytest

from models.encoding import EncodedField, bucket_log_odds, encode_fold


def test_a_bucket_rich_in_human_labels_scores_above_zero_and_an_unseen_one_at_zero() -> None:
    codes = np.array([1] * 100 + [2] * 100)
    human = np.r_[np.ones(80), np.zeros(20), np.ones(20), np.zeros(80)]
    table = bucket_log_odds(codes, human, np.ones(200), buckets=4, smoothing=1.0)
    assert table[1] > 1.0 > -1.0 > table[2]
    assert table[0] == table[3] == 0.0  # no clicks: the overall rate, log-odds 0


def test_smoothing_pulls_a_thin_bucket_towards_the_overall_rate() -> None:
    codes = np.array([1, 1] + [2] * 198)
    human = np.r_[np.ones(2), np.tile([1.0, 0.0], 99)]
    light, heavy = (
        bucket_log_odds(codes, human, np.ones(200), 3, smoothing=s)[1] for s in (1.0, 100.0)
    )
    assert light > 1.0 and 0 < heavy < 0.1


def test_the_rate_is_read_under_the_weights() -> None:
    # Bucket 1 has few human labels, but each weighs as much as the rest of its cell
    # (propensity weights): weighted, it is as human as bucket 2.
    codes = np.array([1] * 100 + [2] * 100)
    human = np.r_[np.ones(10), np.zeros(90), np.ones(50), np.zeros(50)]
    weights = np.r_[np.full(10, 9.0), np.ones(90), np.ones(100)]
    table = bucket_log_odds(codes, human, weights, 3, smoothing=1.0)
    assert abs(table[1] - table[2]) < 0.05
    assert bucket_log_odds(codes, human, np.ones(200), 3, smoothing=1.0)[1] < table[2] - 1


def test_one_class_only_encodes_nothing() -> None:
    codes = np.array([0, 1, 2])
    assert not bucket_log_odds(codes, np.ones(3), np.ones(3), 3).any()
    assert not bucket_log_odds(codes, np.zeros(3), np.zeros(3), 3).any()


def _fold_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.zeros((600, 2), dtype=np.float32)
    x[:, 1] = rng.integers(0, 8, 600)
    human = (rng.random(600) < np.where(x[:, 1] < 4, 0.8, 0.2)).astype(float)
    inner = np.repeat([0, 1, 2], 200)
    return x, human, inner


def test_a_training_click_is_encoded_from_the_other_folds_only() -> None:
    x, human, inner = _fold_data()
    fields = [EncodedField(1, 8)]
    train = np.arange(600)
    base = encode_fold(x, human, np.ones(600), train, inner, fields, smoothing=5.0)
    flipped = human.copy()
    flipped[:200] = 1 - flipped[:200]  # every label of fold 0 flipped
    after = encode_fold(x, flipped, np.ones(600), train, inner, fields, smoothing=5.0)
    # Fold 0's raw values do not move (they came from folds 1 and 2); the standardisation
    # moves them all alike, so compare the clicks' order within the fold.
    assert np.array_equal(
        np.argsort(base.train[:200, 0], kind="stable"),
        np.argsort(after.train[:200, 0], kind="stable"),
    )
    assert not np.allclose(base.train[200:, 0], after.train[200:, 0])


def test_the_tables_come_from_every_training_click_on_the_training_scale() -> None:
    x, human, inner = _fold_data(1)
    fields = [EncodedField(1, 8)]
    enc = encode_fold(x, human, np.ones(600), np.arange(600), inner, fields, smoothing=5.0)
    assert abs(enc.train.mean()) < 1e-5 and abs(enc.train.std() - 1) < 1e-4
    table = enc.tables[0]
    assert table.shape == (8,) and table[:4].min() > table[4:].max()
    # The shipped table and the out-of-fold values agree on what each bucket is.
    codes = x[:, 1].astype(int)
    assert np.corrcoef(table[codes], enc.train[:, 0])[0, 1] > 0.95


def test_bad_arguments_are_refused() -> None:
    x, human, inner = _fold_data()
    with pytest.raises(ValueError, match="smoothing"):
        encode_fold(x, human, np.ones(600), np.arange(600), inner, [EncodedField(1, 8)], 0.0)
    with pytest.raises(ValueError, match="inner_fold"):
        encode_fold(x, human, np.ones(600), np.arange(600), inner[:5], [EncodedField(1, 8)])
