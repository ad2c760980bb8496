"""The classifiers: per-field embeddings and DCN-v2 layers inside the exported graph, the
averaged fold models, the day folds of the cross-fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.encoding import EncodedField, encode_fold, field_codes
from models.export import export_onnx, max_export_error
from models.pipeline import choose_architecture, split_by_day
from models.training import (
    AveragedClassifier,
    FusedAverage,
    IdColumn,
    TargetEncoding,
    TrainConfig,
    fit,
    fuse,
    mlp,
    predict,
)

DAY = 86_400.0


def _data(n: int = 4_000, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two dense columns and two id columns; robots click ads 1-9 of table "ad"."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 4), dtype=np.float32)
    x[:, :2] = rng.normal(size=(n, 2))
    x[:, 2] = rng.integers(0, 64, n)  # ad bucket
    x[:, 3] = rng.integers(0, 16, n)  # publisher bucket
    y = ((x[:, 2] >= 1) & (x[:, 2] <= 9)).astype(np.float32)
    return x, y


IDS = [IdColumn(2, "ad", 64), IdColumn(3, "publisher", 16)]
MASK = np.array([1, 1, 0, 0], dtype=np.float32)  # ids are not numbers


def test_embeddings_learn_which_ids_are_robotic_and_export_exactly(tmp_path: Path) -> None:
    x, y = _data()
    config = TrainConfig(max_epochs=6)
    model = mlp(4, x.mean(0), x.std(0), config, MASK, IDS)
    fit(model, x, y, np.ones(len(x)), None, None, None, config)
    scores = predict(model, x)
    assert scores[y == 1].min() > scores[y == 0].max() - 0.5
    assert np.mean((scores > 0.5) == (y == 1)) > 0.95
    path = export_onnx(model, 4, tmp_path / "model.onnx")
    # Ids outside their tables (hostile or from another spec) are clamped, never fail.
    wild = x.copy()
    wild[:5, 2] = [-3, 64, 10_000, 1e9, 63.0]
    assert max_export_error(model, path, wild) <= 1e-5


def test_early_stopping_keeps_the_epoch_with_the_best_validation_auc() -> None:
    x, y = _data(seed=3)
    config = TrainConfig(max_epochs=5, patience=5)
    model = mlp(4, x.mean(0), x.std(0), config, MASK, IDS)
    # Validation labels flipped on the ads: the better training ranks them, the worse
    # validation AUC gets, so the first epoch's model is kept, whatever its loss.
    log = fit(model, x, y, np.ones(len(x)), x[:800], 1 - y[:800], np.ones(800), config)
    assert len(log.val_auc) == log.epochs == 5
    assert log.best_epoch == int(np.argmax(log.val_auc)) + 1
    assert predict(model, x[:800]).std() > 0


def test_dcn_layers_and_the_averaged_folds_export_exactly(tmp_path: Path) -> None:
    x, y = _data(seed=2)
    config = TrainConfig(max_epochs=2)
    members = []
    for seed in (1, 2):
        member = mlp(
            4, x.mean(0), x.std(0), TrainConfig(max_epochs=2, seed=seed), MASK, IDS, cross_layers=2
        )
        fit(member, x, y, np.ones(len(x)), x[:500], y[:500], np.ones(500), config)
        members.append(member)
    averaged = AveragedClassifier(members).eval()
    np.testing.assert_allclose(
        predict(averaged, x), (predict(members[0], x) + predict(members[1], x)) / 2, atol=1e-6
    )
    path = export_onnx(averaged, 4, tmp_path / "model.onnx")
    assert max_export_error(averaged, path, x) <= 1e-5


@pytest.mark.parametrize(
    ("ids", "cross_layers"),
    [(IDS, 0), (IDS, 2), ([], 0), ([], 1)],
    ids=["mlp", "dcn", "dense", "dense-dcn"],
)
def test_averaged_members_are_exported_as_one_batched_network_with_the_same_scores(
    tmp_path: Path, ids: list[IdColumn], cross_layers: int
) -> None:
    x, y = _data(seed=4)
    mask = MASK if ids else np.array([1, 1, 1, 1], dtype=np.float32)
    members = []
    for seed in (1, 2, 3):
        member = mlp(4, x.mean(0), x.std(0), TrainConfig(seed=seed), mask, ids, cross_layers)
        fit(member, x, y, np.ones(len(x)), None, None, None, TrainConfig(max_epochs=1, seed=seed))
        members.append(member)
    averaged = AveragedClassifier(members).eval()
    fused = fuse(averaged)
    assert isinstance(fused, FusedAverage)
    wild = x.copy()
    wild[:4, 2] = [-3, 64, 1e9, 63.0]  # ids outside the tables are clamped in both forms
    np.testing.assert_allclose(predict(fused, wild), predict(averaged, wild), atol=1e-6)
    path = export_onnx(averaged, 4, tmp_path / "model.onnx")
    assert max_export_error(averaged, path, wild) <= 1e-5


def test_members_that_cannot_be_stacked_stay_averaged_one_by_one() -> None:
    x, _ = _data(seed=5)
    config = TrainConfig()
    other_statistics = mlp(4, x.mean(0) + 1.0, x.std(0), config, MASK, IDS)
    assert isinstance(
        fuse(
            AveragedClassifier([mlp(4, x.mean(0), x.std(0), config, MASK, IDS), other_statistics])
        ),
        AveragedClassifier,
    )
    with_cross = mlp(4, x.mean(0), x.std(0), config, MASK, IDS, cross_layers=1)
    plain = mlp(4, x.mean(0), x.std(0), config, MASK, IDS)
    assert isinstance(fuse(AveragedClassifier([plain, with_cross])), AveragedClassifier)
    assert fuse(plain) is plain


def test_each_fit_day_is_held_out_once_and_the_test_day_never() -> None:
    ts = np.sort(np.random.default_rng(3).uniform(0, 4 * DAY, 2_000))
    split = split_by_day(ts)
    test = set(split.test.tolist())
    held = [set(h.tolist()) for _, h in split.folds()]
    assert len(held) == 3
    assert set().union(*held) == set(split.fit.tolist())
    assert sum(len(h) for h in held) == len(split.fit)
    for train, held_out in split.folds():
        trained_on = set(train.tolist())
        assert not trained_on & set(held_out.tolist()) and not trained_on & test


def test_with_two_fit_days_the_folds_split_users_across_both_days() -> None:
    rng = np.random.default_rng(4)
    ts = np.sort(rng.uniform(0, 3 * DAY, 3_000))
    users = np.array([f"u{i}" for i in rng.integers(0, 300, ts.size)], dtype=object)
    split = split_by_day(ts, users)
    assert split.by_user and split.fold_unit == "user folds"
    folds = split.folds()
    assert len(folds) == 4
    held = np.concatenate([h for _, h in folds])
    assert np.array_equal(np.sort(held), split.fit)  # every fit click held out once
    for train, held_out in folds:
        assert not set(users[train]) & set(users[held_out])  # a user is in one fold
        assert not set(train.tolist()) & set(split.test.tolist())
        assert len(np.unique(split.day[held_out])) == 2  # each fold holds both fit days
        assert 0.15 < len(held_out) / len(split.fit) < 0.35
    # Stable across processes: the user's hash, not its position.
    again = split_by_day(ts[::-1].copy(), users[::-1].copy())
    assert np.array_equal(again.group[::-1], split.group)
    # Three or more fit days: day folds, users or not.
    four_days = np.sort(rng.uniform(0, 4 * DAY, 3_000))
    assert not split_by_day(four_days, users).by_user
    assert split_by_day(four_days, users).fold_unit == "fit days"
    assert not split_by_day(ts).by_user  # no users given: day folds


def test_a_retrain_keeps_the_active_architecture_unless_another_is_clearly_better() -> None:
    rows = [
        {"model": "mlp_hashed", "oof_weak_auc": 0.700},
        {"model": "dcn_embeddings", "oof_weak_auc": 0.685},
    ]
    assert choose_architecture(rows, None) == "mlp_hashed"
    assert choose_architecture(rows, "dcn_embeddings") == "dcn_embeddings"  # within 0.02
    assert choose_architecture(rows, "dcn_embeddings", margin=0.01) == "mlp_hashed"
    assert choose_architecture(rows, "retired_variant") == "mlp_hashed"
    # A first training (or a retired incumbent): the preferred variant holds its place.
    assert choose_architecture(rows, None, preferred="dcn_embeddings") == "dcn_embeddings"
    assert choose_architecture(rows, "retired_variant", preferred="dcn_embeddings") == (
        "dcn_embeddings"
    )
    assert choose_architecture(rows, None, margin=0.01, preferred="dcn_embeddings") == (
        "mlp_hashed"
    )


def _encoded(x: np.ndarray, y: np.ndarray, fold: int) -> TargetEncoding:
    """An encoding of the ad column and the ad x publisher pair as one fold of a
    cross-fit would build it."""
    train = np.nonzero(np.arange(len(x)) % 4 != fold)[0]
    inner = train % 4
    fields = [EncodedField(2, 64), EncodedField(2, 128, crossed=3)]
    enc = encode_fold(x, y < 0.5, np.ones(len(x)), train, inner, fields, 5.0)
    return TargetEncoding(enc)


def test_target_encoded_members_fuse_and_export_with_the_same_scores(tmp_path: Path) -> None:
    x, y = _data(seed=6)
    members = []
    for fold in (0, 1, 2):  # each member its own fold's tables
        member = mlp(
            4, x.mean(0), x.std(0), TrainConfig(seed=fold), MASK, IDS, 1, _encoded(x, y, fold)
        )
        fit(member, x, y, np.ones(len(x)), None, None, None, TrainConfig(max_epochs=1, seed=fold))
        members.append(member)
    averaged = AveragedClassifier(members).eval()
    fused = fuse(averaged)
    assert isinstance(fused, FusedAverage) and fused.n_encoded == 2
    wild = x.copy()
    wild[:4, 2] = [-3, 64, 1e9, 63.0]  # outside the table: clamped, as the embeddings
    wild[4:6, 3] = [-1, 1e12]  # a pair lands in its table whatever it is given
    np.testing.assert_allclose(predict(fused, wild), predict(averaged, wild), atol=1e-6)
    path = export_onnx(fused, 4, tmp_path / "model.onnx")
    assert max_export_error(fused, path, wild) <= 1e-5


def test_the_graph_looks_up_the_buckets_the_encoding_was_built_for() -> None:
    x, y = _data(seed=8)
    encoding = _encoded(x, y, 1)
    x[:3, 2] = [-3, 1e9, 63.5]
    rows = encoding.rows(torch.from_numpy(x)).numpy()
    assert np.array_equal(rows[:, 0], field_codes(x, EncodedField(2, 64)))
    assert np.array_equal(rows[:, 1] - 64, field_codes(x, EncodedField(2, 128, crossed=3)))


def test_training_clicks_bring_their_own_encodings_and_scored_clicks_look_them_up() -> None:
    x, y = _data(seed=7)
    encoding = _encoded(x, y, 0)
    model = mlp(4, x.mean(0), x.std(0), TrainConfig(), MASK, IDS, 0, encoding).eval()
    looked_up = predict(model, x)
    given = np.hstack([x, encoding(torch.from_numpy(x)).numpy()])
    np.testing.assert_allclose(predict(model, given), looked_up, atol=1e-6)
    other = np.hstack([x, np.full((len(x), 2), 5.0, dtype=np.float32)])
    assert np.abs(predict(model, other) - looked_up).max() > 1e-3
