"""The classifiers: the SLIDR MLP, and the logistic-regression and velocity baselines.

Torch is only needed here (the ``train`` extra); serving runs the exported ONNX graph.
Each torch model carries its input standardisation as fixed buffers, so the ONNX file
takes raw features and nothing else has to travel with it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from features.definitions import INDEX
from models.encoding import MAX_ID, PAIR_MULTIPLIER, Encodings
from models.metrics import weighted_auc


@dataclass(frozen=True)
class TrainConfig:
    hidden: tuple[int, int] = (64, 32)
    l2: float = 1e-4  # weight decay on every layer (SLIDR's L2 regularisation)
    learning_rate: float = 2e-3
    batch_size: int = 2048
    max_epochs: int = 8
    patience: int = 3  # epochs without validation improvement before stopping
    seed: int = 7
    threads: int = 2
    embedding_dim: int = 8  # per categorical field
    # Embedding rows learn only from the clicks of their value, a few times an epoch for
    # most ads: a faster rate and no decay let them move within the few epochs that early
    # stopping allows.
    embedding_lr_factor: float = 10.0

    def to_dict(self) -> dict:
        return asdict(self)


class Standardize(nn.Module):
    """(x - mean) / std with fixed statistics from the training split.

    Inputs whose ``mask`` is 0 are fed to the network as 0 whatever their value: the
    model cannot extrapolate to values training never saw (e.g. a weekday absent from
    a few days of training data), so such inputs are switched off, inside the exported
    graph, so serving does exactly the same.
    """

    # Buffers, registered in __init__ (declared here for the type checker).
    mean: torch.Tensor
    std: torch.Tensor
    mask: torch.Tensor

    def __init__(self, mean: np.ndarray, std: np.ndarray, mask: np.ndarray | None = None) -> None:
        super().__init__()
        mask = np.ones_like(mean) if mask is None else mask.astype(np.float32)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer(
            "std", torch.tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32)
        )
        self.register_buffer("mask", torch.tensor(mask, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std * self.mask


@dataclass(frozen=True)
class IdColumn:
    """One input column holding a hashed bucket index (0: absent) of a categorical field,
    and the embedding table it feeds; columns sharing a table are summed (a bag)."""

    column: int
    table: str
    buckets: int


class FieldEmbeddings(nn.Module):
    """One hashed embedding table per categorical field, inside the exported graph.

    The raw feature row carries each field's bucket index as a float (exact below 2**24),
    so the ONNX graph keeps its single float input; indices are clamped into the table,
    so no input can make the lookup fail. No vocabulary travels with the model: an unseen
    value lands in its hash bucket, whose vector training shaped from the values sharing it.
    """

    def __init__(self, columns: Sequence[IdColumn], dim: int) -> None:
        super().__init__()
        tables: dict[str, list[IdColumn]] = {}
        for c in columns:
            tables.setdefault(c.table, []).append(c)
        self.names = sorted(tables)
        self.tables = nn.ModuleList()
        for i, name in enumerate(self.names):
            cols = tables[name]
            self.tables.append(nn.Embedding(cols[0].buckets, dim))
            self.register_buffer(
                f"cols_{i}", torch.tensor([c.column for c in cols], dtype=torch.long)
            )
        self.out_dim = dim * len(self.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for i, module in enumerate(self.tables):
            table = cast(nn.Embedding, module)  # the list holds only the tables built above
            ids = x.index_select(1, getattr(self, f"cols_{i}"))
            ids = ids.clamp(0, table.num_embeddings - 1).long()
            parts.append(table(ids).sum(dim=1))
        return torch.cat(parts, dim=1)


class TargetEncoding(nn.Module):
    """Fixed inputs per id bucket (``models.encoding``: how often a bucket's clicks carry
    a human label), looked up inside the exported graph like the embeddings: no table
    travels beside the model. All fields' tables lie end to end in one buffer."""

    # Buffers, registered in __init__ (declared here for the type checker).
    cols: torch.Tensor
    partners: torch.Tensor
    crossed: torch.Tensor
    offsets: torch.Tensor
    limits: torch.Tensor
    values: torch.Tensor

    def __init__(self, encodings: Encodings) -> None:
        super().__init__()
        fields = encodings.fields
        sizes = [f.buckets for f in fields]
        self.register_buffer("cols", torch.tensor([f.column for f in fields], dtype=torch.long))
        # A single column's "partner" is itself, unused: every field runs the same ops.
        self.register_buffer(
            "partners",
            torch.tensor([f.column if f.crossed is None else f.crossed for f in fields]).long(),
        )
        self.register_buffer("crossed", torch.tensor([f.crossed is not None for f in fields]))
        self.register_buffer("offsets", torch.tensor(np.cumsum([0, *sizes[:-1]]), dtype=torch.long))
        self.register_buffer("limits", torch.tensor(sizes, dtype=torch.long) - 1)
        self.register_buffer("values", torch.from_numpy(np.concatenate(encodings.tables)))

    @property
    def width(self) -> int:
        """Inputs it adds: one per encoded field."""
        return len(self.cols)

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Each click's row per field in ``values``."""
        return _encoded_rows(x, self.cols, self.partners, self.crossed, self.limits, self.offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.values[self.rows(x)]


def _encoded_rows(
    x: torch.Tensor,
    cols: torch.Tensor,
    partners: torch.Tensor,
    crossed: torch.Tensor,
    limits: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """Each click's row per field in a ``TargetEncoding``'s end-to-end tables, as
    ``models.encoding.field_codes`` computes its bucket; any input lands inside its
    field's table."""
    ids = x.index_select(1, cols).clamp(0, MAX_ID).long()
    other = x.index_select(1, partners).clamp(0, MAX_ID).long()
    pair = torch.remainder(ids * PAIR_MULTIPLIER + other, limits + 1)
    return torch.where(crossed, pair, torch.minimum(ids, limits)) + offsets


class CrossNetwork(nn.Module):
    """DCN-v2 cross layers: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l, explicit feature crosses
    of bounded degree (one per layer) before the deep part."""

    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class RobotClassifier(nn.Module):
    """Standardisation (and field embeddings, when given), then a network producing one
    logit; ``forward`` returns P(robot)."""

    def __init__(
        self,
        standardize: Standardize,
        body: nn.Module,
        embeddings: FieldEmbeddings | None = None,
        encoding: TargetEncoding | None = None,
    ) -> None:
        super().__init__()
        self.standardize = standardize
        self.embeddings = embeddings
        self.encoding = encoding
        self.body = body

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        n = self.standardize.mean.shape[0]
        extra = x.shape[1] > n
        if extra:
            # Training clicks bring their out-of-fold encodings as extra columns (a
            # click's own label must not reach its input; see models.encoding); every
            # other click, and the exported graph, looks its buckets up.
            x, encoded = x[:, :n], x[:, n:]
        parts = [self.standardize(x)]
        if self.embeddings is not None:
            parts.append(self.embeddings(x))
        if self.encoding is not None:
            parts.append(encoded if extra else self.encoding(x))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.inputs(x)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class AveragedClassifier(nn.Module):
    """The mean P(robot) of several classifiers: the cross-fitted fold models shipped as
    one model (one ONNX graph), so that every fit day trains the model that ships while
    the thresholds come from scores of models that had not seen the clicks."""

    def __init__(self, members: Sequence[RobotClassifier]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members], dim=0).mean(dim=0)


class FusedAverage(nn.Module):
    """An ``AveragedClassifier`` evaluated as one batched network: every weight matrix
    stacked over the members, every embedding table holding the members' vectors side by
    side. The exported graph then has one operation per layer instead of one per layer
    and member; the scores are the same to float rounding.

    Why: cross-fitting ships several networks per fit day, and ONNX Runtime spends most
    of a small model's time dispatching operations. For 500-click batches on one core
    (ad-hoc measurements on the 2-core development machine): 12 DCN members took 22.8 µs
    a click averaged one by one and 13.8 µs fused; 6 MLP members 6.9 and 2.3 µs. The model
    ``slidr bench`` trains (6 DCN members, fused, switched-off inputs dropped) scores in
    5.0 µs a click, against 3.4 µs for the 2 members it shipped before.

    Inputs switched off (``Standardize.mask``) are left out of the batched network: a
    zero input stays zero through the cross layers (x0 * (...) + x) and adds nothing to
    the first deep layer, so dropping its rows and columns changes no score, and the
    layers shrink (the ids and the hashed context are switched off in the embedding
    variants, the propensity inputs in all).

    Build it with ``fuse``, which checks that the members can be stacked.
    """

    # Buffers, registered in __init__ (declared here for the type checker).
    active: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    encoded_cols: torch.Tensor
    encoded_partners: torch.Tensor
    encoded_crossed: torch.Tensor
    encoded_limits: torch.Tensor
    encoded_offsets: torch.Tensor
    encoded_values: torch.Tensor

    def __init__(self, members: Sequence[RobotClassifier]) -> None:
        super().__init__()
        first = members[0]
        on = first.standardize.mask > 0  # the same statistics in every member
        self.register_buffer("active", torch.nonzero(on).reshape(-1))
        self.register_buffer("mean", first.standardize.mean[on].clone())
        self.register_buffer("std", first.standardize.std[on].clone())
        self.n_members = len(members)
        self.embedding_dim = 0
        self.n_tables = 0
        width = len(on)
        if first.embeddings is not None:
            self.n_tables = len(first.embeddings.tables)
            self.embedding_dim = cast(nn.Embedding, first.embeddings.tables[0]).embedding_dim
            width += first.embeddings.out_dim
            for i in range(self.n_tables):
                side_by_side = torch.cat(
                    [cast(nn.Embedding, _embeddings(m).tables[i]).weight.detach() for m in members],
                    dim=1,
                )
                self.register_buffer(f"table_{i}", side_by_side)
                self.register_buffer(f"cols_{i}", _table_columns(first.embeddings)[i])
        self.n_encoded = 0
        if first.encoding is not None:
            # Each member's encoding came from its own fold's training clicks: the
            # members' values side by side, one column per member.
            self.n_encoded = first.encoding.width
            width += self.n_encoded
            for b in _ENCODING_LAYOUT:  # the same in every member
                self.register_buffer(f"encoded_{b}", getattr(first.encoding, b).clone())
            self.register_buffer(
                "encoded_values",
                torch.stack([_encoding(m).values for m in members], dim=1).contiguous(),
            )
        # Positions of the members' input vector (standardised columns, then embeddings,
        # then encodings) that the batched network keeps.
        keep = torch.cat([torch.nonzero(on).reshape(-1), torch.arange(len(on), width)])
        cross, deep = _split_body(first.body)
        self.n_cross = 0 if cross is None else len(cross.layers)
        for layer in range(self.n_cross):
            self._stack(f"cross_{layer}", [_cross_layer(m, layer) for m in members], keep, keep)
        positions = [i for i, module in enumerate(deep) if isinstance(module, nn.Linear)]
        self.n_deep = len(positions)
        for j, i in enumerate(positions):
            linears = [cast(nn.Linear, _split_body(m.body)[1][i]) for m in members]
            self._stack(f"deep_{j}", linears, keep if j == 0 else None, None)

    def _stack(
        self,
        name: str,
        linears: Sequence[nn.Linear],
        rows: torch.Tensor | None,
        columns: torch.Tensor | None,
    ) -> None:
        # (members, in, out) and (members, 1, out): x @ W + b for every member at once;
        # ``rows`` and ``columns`` pick the inputs and outputs kept (None: all).
        w = torch.stack([lin.weight.detach().T for lin in linears])
        b = torch.stack([lin.bias.detach() for lin in linears]).unsqueeze(1)
        if rows is not None:
            w = w.index_select(1, rows)
        if columns is not None:
            w, b = w.index_select(2, columns), b.index_select(2, columns)
        self.register_buffer(f"{name}_w", w.contiguous())
        self.register_buffer(f"{name}_b", b.contiguous())

    def _linear(self, name: str, h: torch.Tensor) -> torch.Tensor:
        return torch.matmul(h, getattr(self, f"{name}_w")) + getattr(self, f"{name}_b")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = (x.index_select(1, self.active) - self.mean) / self.std
        n, m = x.shape[0], self.n_members
        parts = [dense.unsqueeze(0).expand(m, n, dense.shape[1])]
        for i in range(self.n_tables):
            table = getattr(self, f"table_{i}")
            ids = x.index_select(1, getattr(self, f"cols_{i}"))
            ids = ids.clamp(0, table.shape[0] - 1).long()
            summed = table[ids].sum(dim=1)  # (clicks, members * dim)
            parts.append(summed.reshape(n, m, self.embedding_dim).transpose(0, 1))
        if self.n_encoded:
            rows = _encoded_rows(
                x,
                self.encoded_cols,
                self.encoded_partners,
                self.encoded_crossed,
                self.encoded_limits,
                self.encoded_offsets,
            )
            encoded = self.encoded_values[rows]  # (clicks, fields, members)
            parts.append(encoded.permute(2, 0, 1))
        x0 = torch.cat(parts, dim=2)  # (members, clicks, kept width)
        h = x0
        for layer in range(self.n_cross):
            h = x0 * self._linear(f"cross_{layer}", h) + h
        for j in range(self.n_deep):
            h = self._linear(f"deep_{j}", h)
            if j < self.n_deep - 1:
                h = torch.relu(h)
        return torch.sigmoid(h.squeeze(-1)).mean(dim=0)


def _cross_layer(model: RobotClassifier, layer: int) -> nn.Linear:
    cross = _split_body(model.body)[0]
    assert cross is not None  # fuse() checked that every member has the same cross layers
    return cast(nn.Linear, cross.layers[layer])


def _embeddings(model: RobotClassifier) -> FieldEmbeddings:
    assert model.embeddings is not None  # fuse() checked that every member has them
    return model.embeddings


def _encoding(model: RobotClassifier) -> TargetEncoding:
    assert model.encoding is not None  # fuse() checked that every member has one
    return model.encoding


def _split_body(body: nn.Module) -> tuple[CrossNetwork | None, nn.Sequential]:
    """(cross layers or None, the deep part) of an ``mlp`` body."""
    if isinstance(body, nn.Sequential) and len(body) == 2 and isinstance(body[0], CrossNetwork):
        return body[0], cast(nn.Sequential, body[1])
    return None, cast(nn.Sequential, body)


def _layout(model: RobotClassifier) -> tuple | None:
    """What must match for members to be stacked: table shapes and columns, the number of
    cross layers and the deep layers' shapes; None for a body ``FusedAverage`` cannot run."""
    cross, deep = _split_body(model.body)
    if not all(isinstance(layer, nn.Linear | nn.ReLU) for layer in deep):
        return None
    tables: tuple = ()
    if model.embeddings is not None:
        tables = tuple(
            (tuple(cast(nn.Embedding, t).weight.shape), tuple(cols.tolist()))
            for t, cols in zip(
                model.embeddings.tables, _table_columns(model.embeddings), strict=True
            )
        )
    layers = tuple(
        tuple(layer.weight.shape) if isinstance(layer, nn.Linear) else "relu" for layer in deep
    )
    encoded: tuple = ()
    if model.encoding is not None:
        encoded = tuple(tuple(getattr(model.encoding, b).tolist()) for b in _ENCODING_LAYOUT)
    return tables, encoded, None if cross is None else len(cross.layers), layers


# A TargetEncoding's buffers that say where its values are looked up (not the values).
_ENCODING_LAYOUT = ("cols", "partners", "crossed", "limits", "offsets")


def _table_columns(embeddings: FieldEmbeddings) -> list[torch.Tensor]:
    return [getattr(embeddings, f"cols_{i}") for i in range(len(embeddings.tables))]


def fuse(model: nn.Module) -> nn.Module:
    """The ``FusedAverage`` of an ``AveragedClassifier`` whose members share their input
    statistics and layer shapes (as cross-fitting builds them); any other model as it is."""
    if not isinstance(model, AveragedClassifier) or len(model.members) < 2:
        return model
    members = [cast(RobotClassifier, m) for m in model.members]
    first = members[0]
    layout = _layout(first)
    if layout is None or any(_layout(m) != layout for m in members):
        return model
    same_inputs = all(
        torch.equal(getattr(m.standardize, b), getattr(first.standardize, b))
        for m in members
        for b in ("mean", "std", "mask")
    )
    return FusedAverage(members).eval() if same_inputs else model


def mlp(
    n_features: int,
    mean: np.ndarray,
    std: np.ndarray,
    config: TrainConfig,
    mask: np.ndarray | None = None,
    ids: Sequence[IdColumn] = (),
    cross_layers: int = 0,
    encoding: TargetEncoding | None = None,
) -> RobotClassifier:
    """SLIDR's model: three fully connected layers with ReLU between them.

    ``ids``: categorical columns looked up in per-field embedding tables whose vectors join
    the standardised inputs (switch those columns off in ``mask``: their raw values mean
    nothing as numbers). ``cross_layers`` > 0 puts DCN-v2 cross layers before the MLP.
    ``encoding``: target-encoded id buckets joining the inputs (models.encoding).
    """
    embeddings = FieldEmbeddings(ids, config.embedding_dim) if ids else None
    width = n_features + (embeddings.out_dim if embeddings is not None else 0)
    width += encoding.width if encoding is not None else 0
    h1, h2 = config.hidden
    deep = nn.Sequential(
        nn.Linear(width, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 1)
    )
    body = deep if cross_layers == 0 else nn.Sequential(CrossNetwork(width, cross_layers), deep)
    return RobotClassifier(Standardize(mean, std, mask), body, embeddings, encoding)


def logistic(
    n_features: int, mean: np.ndarray, std: np.ndarray, mask: np.ndarray | None = None
) -> RobotClassifier:
    return RobotClassifier(Standardize(mean, std, mask), nn.Linear(n_features, 1))


def unseen_weekday_mask(ts_train: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Input mask switching day-of-week off unless training covers all seven weekdays."""
    mask = np.ones(len(names), dtype=np.float32)
    weekdays = np.unique(np.mod(np.floor_divide(ts_train, 86_400).astype(np.int64) + 3, 7))
    if len(weekdays) < 7:
        for name in ("dow_sin", "dow_cos"):
            mask[names.index(name)] = 0.0
    return mask


@dataclass
class FitLog:
    epochs: int
    best_epoch: int
    train_loss: list[float]
    val_loss: list[float]
    seconds: float
    val_auc: list[float] = field(default_factory=list)  # what early stopping read


def fit(
    model: RobotClassifier,
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    w_val: np.ndarray | None,
    config: TrainConfig,
    progress: Callable[[str], None] | None = None,
) -> FitLog:
    """Weighted binary cross-entropy with Adam and L2; keeps the best validation epoch,
    judged by the weighted AUC of the weak label on the validation clicks.

    Why AUC and not the validation loss: on weak labels the weighted loss rises after one
    or two epochs (a few human labels of label-poor cells carry large weights, and the
    model grows confident on the others) while the ranking, which is all the thresholds
    use, can still improve. On ``slidr simulate --world proxy_lies`` (5 days of 40k
    clicks) the DCN folds stopped at epochs 1-2 on the loss and at 1-11 on AUC; bot
    recall at 1% true human FPR of the averaged DCN on the held-out day went 0.59 -> 0.68
    (seed 1), 0.58 -> 0.53 (seed 2), 0.65 -> 0.66 (seed 3): better on average, still noisy.

    Without validation data (``x_val`` None) it runs exactly ``config.max_epochs``
    epochs: the refit on all days, whose epoch count the cross-fitted folds chose.
    """
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    xt, yt, wt = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (x, y, w))
    # Small data sets get smaller batches: an epoch of 40k clicks in batches of 2,048 is
    # 20 steps, and early stopping then ends training before it has learnt anything.
    batch_size = int(min(config.batch_size, max(128, len(x) // 200)))
    validate = x_val is not None
    if validate:
        xv, yv, wv = (
            torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            for a in (x_val, y_val, w_val)
        )
    tables = [p for n, p in model.named_parameters() if ".tables." in n or n.startswith("tables.")]
    others = [
        p for n, p in model.named_parameters() if not (".tables." in n or n.startswith("tables."))
    ]
    groups: list[dict[str, Any]] = [{"params": others}]
    if tables:
        groups.append(
            {
                "params": tables,
                "lr": config.learning_rate * config.embedding_lr_factor,
                "weight_decay": 0.0,
            }
        )
    optimiser = torch.optim.Adam(groups, lr=config.learning_rate, weight_decay=config.l2)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    generator = torch.Generator().manual_seed(config.seed)
    # (validation figure, higher is better; its epoch; the model's state then)
    best: tuple[float, int, dict[str, torch.Tensor] | None] = (-math.inf, 0, None)
    train_losses: list[float] = []
    val_losses: list[float] = []
    val_aucs: list[float] = []
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = (loss_fn(model.logits(xt[idx]), yt[idx]) * wt[idx]).sum() / wt[idx].sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        train_losses.append(total / len(order))
        model.eval()
        if not validate:
            if progress:
                progress(f"epoch {epoch}: train loss {train_losses[-1]:.4f}")
            best = (-math.inf, epoch, None)
            continue
        with torch.no_grad():
            logits = model.logits(xv)
            val_losses.append(float((loss_fn(logits, yv) * wv).sum() / wv.sum()))
        # Both classes are present whenever weak labels are (else AUC is undefined and
        # the loss decides).
        auc = weighted_auc(logits.numpy(), yv.numpy() > 0.5, wv.numpy())
        val_aucs.append(math.nan if auc is None else auc)
        val = -val_losses[-1] if auc is None else auc
        if progress:
            progress(
                f"epoch {epoch}: train loss {train_losses[-1]:.4f}, validation loss "
                f"{val_losses[-1]:.4f}, weighted AUC {val_aucs[-1]:.4f}"
            )
        if val > best[0] + 1e-5:
            best = (val, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= config.patience:
            break
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    return FitLog(
        len(train_losses),
        best[1],
        train_losses,
        val_losses,
        time.perf_counter() - started,
        val_aucs,
    )


def predict(model: nn.Module, x: np.ndarray, batch: int = 65_536) -> np.ndarray:
    """P(robot) per row with the torch model (float64): a ``RobotClassifier`` or the
    ``AveragedClassifier`` of several."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            chunk = torch.from_numpy(
                np.ascontiguousarray(x[start : start + batch], dtype=np.float32)
            )
            out.append(model(chunk).numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


# The velocity heuristic: the largest ratio of a velocity counter to its rule-of-thumb
# limit, squashed into [0, 1). What a rules engine without a model would do.
VELOCITY_LIMITS = {
    "u_clicks_1m": 10.0,
    "u_clicks_1h": 60.0,
    "u_clicks_1d": 300.0,
    "ip_clicks_1m": 30.0,
    "ip_clicks_1h": 300.0,
}


def velocity_scores(x: np.ndarray) -> np.ndarray:
    """Velocity-heuristic robot score per row of a feature matrix."""
    ratios = [
        np.expm1(x[:, INDEX[name]].astype(np.float64)) / limit
        for name, limit in VELOCITY_LIMITS.items()
    ]
    v = np.max(np.stack(ratios, axis=1), axis=1)
    return v / (1.0 + v)
