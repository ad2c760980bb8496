"""Batch scoring of a data set with a registered version (``slidr score`` / ``evaluate``).

Features come from the vectorised path, which equals what the stream worker computes
click by click on the same time-ordered events.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.dataset import Dataset
from features.batch import compute_features
from features.columns import ClickColumns
from models import metrics
from models.labels import make_labels
from models.registry import ModelVersion
from models.scoring import decide, reason_codes


@dataclass
class ScoredClicks:
    clicks: ClickColumns
    features: np.ndarray
    slices: np.ndarray
    scores: np.ndarray
    thresholds: np.ndarray
    invalid: np.ndarray
    version: str

    def reasons(self, i: int) -> list[str]:
        return reason_codes(self.features[i]) if self.invalid[i] else []


def score_clicks(model: ModelVersion, clicks: ClickColumns, batch: int = 65_536) -> ScoredClicks:
    features, slices = compute_features(clicks)
    scores = (
        np.concatenate(
            [model.scorer.score(features[s : s + batch]) for s in range(0, len(features), batch)]
        )
        if len(features)
        else np.zeros(0)
    )
    thresholds = model.thresholds_for(slices)
    return ScoredClicks(
        clicks, features, slices, scores, thresholds, decide(scores, thresholds), model.version
    )


def write_scores(scored: ScoredClicks, path: Path) -> int:
    """One row per click to ``.jsonl`` or ``.parquet``; returns the row count."""
    reasons = [scored.reasons(i) for i in range(len(scored.scores))]
    table = pa.table(
        {
            "click_id": pa.array(scored.clicks.click_id, type=pa.string()),
            "ts": pa.array(scored.clicks.ts, type=pa.float64()),
            "score": pa.array(scored.scores, type=pa.float64()),
            "verdict": pa.array(np.where(scored.invalid, "invalid", "valid"), type=pa.string()),
            "threshold": pa.array(scored.thresholds, type=pa.float64()),
            "slice": pa.array(scored.slices, type=pa.string()),
            "reasons": pa.array(reasons, type=pa.list_(pa.string())),
            "model_version": pa.array([scored.version] * len(scored.scores), type=pa.string()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(table, path, compression="zstd")
    elif path.suffix == ".jsonl":
        import orjson

        with path.open("wb") as handle:
            for row in table.to_pylist():
                handle.write(orjson.dumps(row) + b"\n")
    else:
        raise ValueError(f"--out must end in .jsonl or .parquet, got {path.name!r}")
    return table.num_rows


def evaluate(model: ModelVersion, data: Dataset, robotic_k: int = 10) -> dict:
    """SPEC §3 metrics of a version on a data set (truth-based ones when it has is_bot)."""
    scored = score_clicks(model, data.clicks)
    labels = make_labels(data.clicks, data.purchases)
    robotic = metrics.robotic_sessions(data.clicks.session_id, data.clicks.ts, k=robotic_k)
    is_bot = data.clicks.extra.get("is_bot")
    result = metrics.compute_metrics(
        scored.invalid,
        labels.purchasing,
        robotic,
        scored.slices,
        None if is_bot is None else is_bot.astype(bool),
    )
    return {"model_version": model.version, "clicks": len(scored.scores), **result}
