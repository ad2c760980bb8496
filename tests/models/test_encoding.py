"""Target encoding of id buckets (models.encoding): what a bucket's rate says, and that a
training click's own label never reaches its own input."""

from __future__ import annotations

import numpy as np
import pytest

from models.encoding import EncodedField, bucket_log_odds, encode_fold, field_codes


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


def test_clicks_of_a_cell_where_nobody_is_labelled_are_no_evidence() -> None:
    # Bucket 2 also draws 300 clicks from a device on which nobody gets labelled (cell 1).
    # Against the overall rate they read as robots; against their cell's rate (0), they
    # add nothing, and the bucket reads as what its labelled cell's clicks say.
    codes = np.array([1] * 100 + [2] * 100)
    human = np.r_[np.ones(50), np.zeros(50), np.ones(50), np.zeros(50)]
    more_codes, more_human = np.r_[codes, np.full(300, 2)], np.r_[human, np.zeros(300)]
    cells = np.r_[np.zeros(200, np.int64), np.ones(300, np.int64)]
    plain = bucket_log_odds(more_codes, more_human, np.ones(500), 3, 1.0)
    against_cells = bucket_log_odds(more_codes, more_human, np.ones(500), 3, 1.0, cells)
    assert plain[2] < plain[1] - 0.5
    assert against_cells[2] == pytest.approx(against_cells[1])
    assert against_cells[0] == 0.0  # no clicks: no evidence


def test_against_the_cells_a_bucket_is_read_within_its_cells() -> None:
    # Cell 0 is labelled at 60%, cell 1 at 20%. Bucket 1 (cell 0) at 60% and bucket 2
    # (cell 1) at 20% are what their cells predict: 0. Bucket 3 sits in cell 1 at 60%:
    # more human than its cell says, though at the overall rate it looks ordinary.
    codes = np.repeat([1, 2, 3], 500)
    cells = np.r_[np.zeros(500, np.int64), np.ones(1000, np.int64)]
    human = np.r_[np.tile([1, 1, 1, 0, 0], 100), np.tile([1, 0, 0, 0, 0], 100)]
    human = np.r_[human, np.tile([1, 1, 1, 0, 0], 100)].astype(float)
    table = bucket_log_odds(codes, human, np.ones(1500), 4, 1.0, cells)
    cell1_rate = (100 + 300) / 1000
    assert table[1] == pytest.approx(0.0, abs=0.01)
    assert table[3] > 0.3 and table[2] < -0.3
    assert np.exp(table[3]) == pytest.approx(300 / (500 * cell1_rate), rel=0.01)


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


def test_the_cells_travel_with_the_fold_clicks() -> None:
    # The cells are given for every row of x and a fold reads those of its own training
    # clicks: encoding rows 300-599 within the whole matrix is encoding them alone.
    x, human, inner = _fold_data(2)
    fields = [EncodedField(1, 8)]
    cells = (x[:, 1] >= 6).astype(np.int64)
    train = np.arange(300, 600)
    enc = encode_fold(x, human, np.ones(600), train, inner[train], fields, 5.0, cells)
    alone = encode_fold(
        x[train],
        human[train],
        np.ones(300),
        np.arange(300),
        inner[train],
        fields,
        5.0,
        cells[train],
    )
    assert np.allclose(enc.train, alone.train) and np.allclose(enc.tables[0], alone.tables[0])


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


def test_a_crossed_pair_reads_what_neither_id_says_alone() -> None:
    # Robots click advertisers 0-2 through publishers 0-2 only; humans click those
    # advertisers through other publishers and those publishers' other advertisers. Each id
    # alone leaves half the humans looking like the robots; the pair tells them apart.
    rng = np.random.default_rng(3)
    n = 20_000
    x = np.zeros((n, 2), dtype=np.float32)
    robot = rng.random(n) < 0.2
    targeted, other = rng.integers(0, 3, (2, n)), rng.integers(3, 12, (2, n))
    via_publisher = rng.random(n) < 0.5
    x[:, 0] = np.where(robot | ~via_publisher, targeted[0], other[0])
    x[:, 1] = np.where(robot | via_publisher, targeted[1], other[1])
    human = (~robot).astype(float)
    fields = [EncodedField(0, 16), EncodedField(1, 16), EncodedField(0, 256, crossed=1)]
    enc = encode_fold(x, human, np.ones(n), np.arange(n), np.arange(n) % 2, fields, 5.0)
    robots, humans = enc.train[robot], enc.train[~robot]
    # Per field, the share of (robot, human) pairs that it ranks the right way round.
    separation = [
        float(np.mean(robots[:, j][:, None] < humans[:, j][None, :2000])) for j in range(3)
    ]
    assert separation[2] > 0.95 and max(separation[:2]) < 0.8
    # The codes stay inside the pair's table, and distinct pairs of one publisher do not
    # share a row.
    codes = field_codes(x, fields[2])
    assert codes.min() >= 0 and codes.max() < 256
    assert len(np.unique(field_codes(np.c_[np.arange(12), np.zeros(12)], fields[2]))) == 12
