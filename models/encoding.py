"""Target encoding of id buckets: for each bucket of a single-column id field (an ad, an
advertiser), how much more or less often its clicks carry a human label than
clicks in general, under the training weights.

Why: the robots that look human in every count (a fresh identity every few clicks,
malware behind its owner's browser and address) give themselves away only by the few
ads, advertisers and publishers they target. Gradient-boosted trees find those values
from their split statistics; the networks' embedding rows learn them slowly from a few
gradient steps per epoch and lean on the counts instead. Handing each network the
bucket's label rate as one more input lets it use the id signal at once. Measured with
``make bench-proxy-lies`` (``slidr simulate --world proxy_lies``, 5 days of 40k clicks):
see the README's "Where it stands" for the figures per seed.

Only what was clicked is encoded (``TrainOptions.target_encoded``): where and from what
device a click came decide who can buy and be labelled, and encoding those hands the
network the propensity that its inputs leave out (see ``TrainOptions``).

A click's own label must not enter its encoding, or the network learns to read the
label back: training clicks are encoded from the other folds' clicks only (nested inside
the cross-fit), and the tables that ship, which encode every click scored later, come
from all of the fold's training clicks.

The encoding is the smoothed log-odds of the weighted human-label rate against the
overall rate: ``log(r_b / (1 - r_b)) - log(r / (1 - r))`` with ``r_b = (H_b + a r) /
(W_b + a)``, where ``W_b`` and ``H_b`` are the weights of the bucket's clicks and of its
labelled humans and ``a`` (``smoothing``) is a weight: a bucket with little weight stays
near 0. The weights are the training weights (propensity-balanced), so a bucket
is not read as human merely because its clicks are of the signed-in kind that gets labelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# In units of the mean training weight (the weights average 1 over the clicks): a bucket
# needs fifty clicks' worth before its own rate counts as much as the overall one. 10 and
# 200 were no better (bot recall on proxy_lies seeds 1, 2, 4 and 8, all fields encoded:
# 0.668 0.629 0.754 0.688 and 0.651 - 0.736 0.699 against 0.674 0.660 0.727 0.679).
DEFAULT_SMOOTHING = 50.0


@dataclass(frozen=True)
class EncodedField:
    """An id column to encode and its number of buckets (the column holds 0..buckets-1)."""

    column: int
    buckets: int


@dataclass(frozen=True)
class EncodingPlan:
    """What a cross-fit target-encodes: the id columns and the smoothing."""

    fields: Sequence[EncodedField]
    smoothing: float = DEFAULT_SMOOTHING


@dataclass
class Encodings:
    """One fold's encodings, standardised by the training clicks' values.

    ``tables[j]``: per bucket of ``fields[j]``, what the shipped model looks up;
    ``train``: per training click (rows in the order given), its out-of-fold values.
    """

    fields: list[EncodedField]
    tables: list[np.ndarray]
    train: np.ndarray


def bucket_log_odds(
    codes: np.ndarray,
    human: np.ndarray,
    weights: np.ndarray,
    buckets: int,
    smoothing: float = DEFAULT_SMOOTHING,
) -> np.ndarray:
    """Per bucket in [0, buckets), the smoothed log-odds of the weighted human-label rate
    of the clicks with that code, relative to all the clicks given (0: no evidence)."""
    total = float(weights.sum())
    if total <= 0:
        return np.zeros(buckets)
    overall = float((weights * human).sum()) / total
    if not 0 < overall < 1:  # one class only: no bucket can differ from it
        return np.zeros(buckets)
    w_b = np.bincount(codes, weights=weights, minlength=buckets)[:buckets]
    h_b = np.bincount(codes, weights=weights * human, minlength=buckets)[:buckets]
    rate = (h_b + smoothing * overall) / (w_b + smoothing)
    return np.log(rate / (1 - rate)) - np.log(overall / (1 - overall))


def encode_fold(
    x: np.ndarray,
    human: np.ndarray,
    weights: np.ndarray,
    train: np.ndarray,
    inner_fold: np.ndarray,
    fields: Sequence[EncodedField],
    smoothing: float = DEFAULT_SMOOTHING,
) -> Encodings:
    """The encodings of one cross-fit fold.

    ``train``: indices of the fold's training clicks; ``inner_fold``: per training click,
    the fold it belongs to (a fit day, or a group of users): each is encoded from the
    training clicks of the other folds. The tables come from all of ``train``.
    """
    if smoothing <= 0:
        raise ValueError(f"smoothing must be positive, got {smoothing}")
    human = np.asarray(human, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    inner_fold = np.asarray(inner_fold)
    if len(inner_fold) != len(train):
        raise ValueError(f"inner_fold has {len(inner_fold)} entries for {len(train)} clicks")
    tables, train_values = [], np.zeros((len(train), len(fields)))
    for j, f in enumerate(fields):
        codes = np.clip(x[train, f.column].astype(np.int64), 0, f.buckets - 1)
        h, w = human[train], weights[train]
        for k in np.unique(inner_fold):
            inside = inner_fold == k
            out = ~inside
            table = bucket_log_odds(codes[out], h[out], w[out], f.buckets, smoothing)
            train_values[inside, j] = table[codes[inside]]
        tables.append(bucket_log_odds(codes, h, w, f.buckets, smoothing))
    # Standardised with the training clicks' statistics, tables alike, so the network sees
    # the same scale in training and serving.
    mean = train_values.mean(axis=0) if len(train) else np.zeros(len(fields))
    std = train_values.std(axis=0) if len(train) else np.ones(len(fields))
    std = np.where(std > 1e-6, std, 1.0)
    return Encodings(
        list(fields),
        [((t - mean[j]) / std[j]).astype(np.float32) for j, t in enumerate(tables)],
        ((train_values - mean) / std).astype(np.float32),
    )
