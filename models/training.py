"""The classifiers: the SLIDR MLP, and the logistic-regression and velocity baselines.

Torch is only needed here (the ``train`` extra); serving runs the exported ONNX graph.
Each torch model carries its input standardisation as fixed buffers, so the ONNX file
takes raw features and nothing else has to travel with it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from features.definitions import INDEX


@dataclass(frozen=True)
class TrainConfig:
    hidden: tuple[int, int] = (64, 32)
    l2: float = 1e-4  # weight decay on every layer (SLIDR's L2 regularisation)
    learning_rate: float = 2e-3
    batch_size: int = 2048
    max_epochs: int = 8
    patience: int = 2  # epochs without validation improvement before stopping
    seed: int = 7
    threads: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


class Standardize(nn.Module):
    """(x - mean) / std with fixed statistics from the training split.

    Inputs whose ``mask`` is 0 are fed to the network as 0 whatever their value: the
    model cannot extrapolate to values training never saw (e.g. a weekday absent from
    a few days of training data), so such inputs are switched off, inside the exported
    graph, so serving does exactly the same.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, mask: np.ndarray | None = None) -> None:
        super().__init__()
        mask = np.ones_like(mean) if mask is None else mask.astype(np.float32)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(np.where(std > 1e-6, std, 1.0), dtype=torch.float32))
        self.register_buffer("mask", torch.tensor(mask, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std * self.mask


class RobotClassifier(nn.Module):
    """Standardisation, then a network producing one logit; ``forward`` returns P(robot)."""

    def __init__(self, standardize: Standardize, body: nn.Module) -> None:
        super().__init__()
        self.standardize = standardize
        self.body = body

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.standardize(x)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def mlp(
    n_features: int, mean: np.ndarray, std: np.ndarray, config: TrainConfig,
    mask: np.ndarray | None = None,
) -> RobotClassifier:  # fmt: skip
    """SLIDR's model: three fully connected layers with ReLU between them."""
    h1, h2 = config.hidden
    body = nn.Sequential(
        nn.Linear(n_features, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 1)
    )
    return RobotClassifier(Standardize(mean, std, mask), body)


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


def fit(
    model: RobotClassifier,
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    w_val: np.ndarray,
    config: TrainConfig,
    progress: Callable[[str], None] | None = None,
) -> FitLog:
    """Weighted binary cross-entropy with Adam and L2; keeps the best validation epoch."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    xt, yt, wt = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (x, y, w))
    xv, yv, wv = (
        torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (x_val, y_val, w_val)
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.l2)
    loss_fn = nn.BCEWithLogitsLoss(reduction="none")
    generator = torch.Generator().manual_seed(config.seed)
    best = (math.inf, 0, None)
    train_losses, val_losses = [], []
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = (loss_fn(model.logits(xt[idx]), yt[idx]) * wt[idx]).sum() / wt[idx].sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        train_losses.append(total / len(order))
        model.eval()
        with torch.no_grad():
            val = float((loss_fn(model.logits(xv), yv) * wv).sum() / wv.sum())
        val_losses.append(val)
        if progress:
            progress(f"epoch {epoch}: train loss {train_losses[-1]:.4f}, validation loss {val:.4f}")
        if val < best[0] - 1e-5:
            best = (val, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= config.patience:
            break
    if best[2] is not None:
        model.load_state_dict(best[2])
    model.eval()
    return FitLog(len(train_losses), best[1], train_losses, val_losses, time.perf_counter() - started)


def predict(model: RobotClassifier, x: np.ndarray, batch: int = 65_536) -> np.ndarray:
    """P(robot) per row with the torch model (float64)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + batch], dtype=np.float32))
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
    ratios = [np.expm1(x[:, INDEX[name]].astype(np.float64)) / limit for name, limit in VELOCITY_LIMITS.items()]
    v = np.max(np.stack(ratios, axis=1), axis=1)
    return v / (1.0 + v)
