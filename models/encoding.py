"""Target encoding of id buckets: for each bucket of an id field (an ad, a publisher, or a
pair such as advertiser x publisher), how much more or less human-labelled weight its
clicks carry than expected, under the training weights.

Why: the robots that look human in every count (a fresh identity every few clicks,
malware behind its owner's browser and address) give themselves away only by the few
ads, advertisers and publishers they target, and often only by the combination (a
campaign cashed out through a few publishers). Gradient-boosted trees find those values
from their split statistics; the networks' embedding rows learn them slowly from a few
gradient steps per epoch and lean on the counts instead. Handing each network the
bucket's label rate as one more input lets it use the id signal at once. Measured with
``make bench-proxy-lies`` (``slidr simulate --world proxy_lies``, 5 days of 40k clicks):
see the README's "Where it stands" for the figures per seed.

Expected against what: where and from what device a click came decide who can buy and
be labelled. Against the overall rate, a publisher whose clicks come from devices on
which nobody is ever labelled reads as robotic, and encoding it hands the network the
propensity that its inputs leave out. So by default (``cells``) each click is expected
to carry its (logged-in, device) cell's weighted human-label rate, and a click in a cell
where nobody is labelled is no evidence either way (see ``bucket_log_odds``).

A click's own label must not enter its encoding, or the network learns to read the
label back: training clicks are encoded from the other folds' clicks only (nested inside
the cross-fit), and the tables that ship, which encode every click scored later, come
from all of the fold's training clicks.

The weights are the training weights (propensity-balanced), so a bucket is not read as
human merely because its clicks are of the signed-in kind that gets labelled; the
smoothing ``a`` is a weight: a bucket with little weight stays near 0.
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


# Ids are bucket numbers well under this; a larger value is clamped to it first, so that
# crossing two ids cannot overflow (float32 holds integers exactly up to here).
MAX_ID = 2**24
# Crossed ids share ``buckets`` rows by ``(a * PAIR_MULTIPLIER + b) mod buckets``: odd, so
# the pairs of one ``b`` spread over distinct rows.
PAIR_MULTIPLIER = 7919


@dataclass(frozen=True)
class EncodedField:
    """An id column to encode and its number of buckets (the column holds 0..buckets-1);
    with ``crossed``, the pair of it and that second id column, hashed into ``buckets``
    (see ``field_codes``)."""

    column: int
    buckets: int
    crossed: int | None = None


def field_codes(x: np.ndarray, field: EncodedField) -> np.ndarray:
    """Each row's bucket of ``field``, in [0, field.buckets): what the exported graph
    computes too (``models.training.TargetEncoding``)."""
    ids = np.clip(x[:, field.column], 0, MAX_ID).astype(np.int64)
    if field.crossed is None:
        return np.minimum(ids, field.buckets - 1)
    other = np.clip(x[:, field.crossed], 0, MAX_ID).astype(np.int64)
    return (ids * PAIR_MULTIPLIER + other) % field.buckets


@dataclass(frozen=True)
class EncodingPlan:
    """What a cross-fit target-encodes: the id columns, the smoothing and, per click (all
    the rows of the feature matrix), the labelling cell it belongs to (None: the plain
    rate; see ``bucket_log_odds``)."""

    fields: Sequence[EncodedField]
    smoothing: float = DEFAULT_SMOOTHING
    cells: np.ndarray | None = None


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
    cells: np.ndarray | None = None,
) -> np.ndarray:
    """Per bucket in [0, buckets), how much more or less human-labelled weight its clicks
    carry than expected, in log-odds (0: no evidence).

    Without ``cells`` the expectation is the overall rate: the smoothed log-odds of the
    bucket's weighted human-label rate against that of all the clicks given.

    With ``cells`` (per click, an integer naming its labelling cell: logged-in status
    and device), each click is expected to carry its cell's weighted human-label rate,
    and the value is ``log((H_b + a r) / (E_b + a r))``: ``H_b`` the bucket's human-label
    weight, ``E_b`` the weight its clicks' cells predict, ``r`` the overall rate, ``a``
    the smoothing. A click in a cell where nobody gets labelled adds nothing to either
    side: there, lacking a label says nothing of being a robot, and a bucket is not read
    as robotic merely because its clicks come from such a device. That is what lets the
    where-and-how ids (publisher, user-agent family) be encoded without handing the
    network who can be labelled.
    """
    total = float(weights.sum())
    if total <= 0:
        return np.zeros(buckets)
    overall = float((weights * human).sum()) / total
    if not 0 < overall < 1:  # one class only: no bucket can differ from it
        return np.zeros(buckets)
    h_b = np.bincount(codes, weights=weights * human, minlength=buckets)[:buckets]
    if cells is None:
        w_b = np.bincount(codes, weights=weights, minlength=buckets)[:buckets]
        rate = (h_b + smoothing * overall) / (w_b + smoothing)
        return np.log(rate / (1 - rate)) - np.log(overall / (1 - overall))
    cell_weight = np.bincount(cells, weights=weights)
    cell_human = np.bincount(cells, weights=weights * human)
    cell_rate = cell_human / np.where(cell_weight > 0, cell_weight, 1.0)
    expected = np.bincount(codes, weights=weights * cell_rate[cells], minlength=buckets)[:buckets]
    prior = smoothing * overall
    return np.log((h_b + prior) / (expected + prior))


def encode_fold(
    x: np.ndarray,
    human: np.ndarray,
    weights: np.ndarray,
    train: np.ndarray,
    inner_fold: np.ndarray,
    fields: Sequence[EncodedField],
    smoothing: float = DEFAULT_SMOOTHING,
    cells: np.ndarray | None = None,
) -> Encodings:
    """The encodings of one cross-fit fold.

    ``train``: indices of the fold's training clicks; ``inner_fold``: per training click,
    the fold it belongs to (a fit day, or a group of users): each is encoded from the
    training clicks of the other folds. The tables come from all of ``train``.
    ``cells``: per click (all the rows of ``x``), its labelling cell, or None (see
    ``bucket_log_odds``).
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
        codes = field_codes(x[train], f)
        h, w = human[train], weights[train]
        c = None if cells is None else np.asarray(cells, dtype=np.int64)[train]
        for k in np.unique(inner_fold):
            inside = inner_fold == k
            out = ~inside
            table = bucket_log_odds(
                codes[out], h[out], w[out], f.buckets, smoothing, None if c is None else c[out]
            )
            train_values[inside, j] = table[codes[inside]]
        tables.append(bucket_log_odds(codes, h, w, f.buckets, smoothing, c))
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
