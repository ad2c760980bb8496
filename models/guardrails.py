"""Guardrails: named checks that refuse anomalous training data or models.

Each check returns a ``GuardrailResult`` (name, passed, measured value, limit, detail);
a ``GuardrailReport`` collects them, and ``raise_if_failed`` stops the job with the
failed names in the message (``slidr train`` exits non-zero with them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class GuardrailConfig:
    min_clicks: int = 1_000  # training clicks (train + validation days)
    min_human_labels: int = 50
    min_slice_clicks: int = 50  # a slice with fewer clicks is ignored, not failed
    min_slice_human_labels: int = 5  # ... but a slice with clicks needs some human labels
    # Human-label density: in every hour (each hour of each day, and each hour of the day
    # pooled over days) the labels must not fall significantly below
    # ``min_relative_human_density`` times what the data set's overall label share
    # predicts for that hour's clicks (one-sided Poisson test at ``density_alpha``). Night
    # hours carry fewer labels naturally (more robots), but not this few; purchase labels
    # missing for a few hours would teach the model that the traffic of those hours is
    # robotic.
    min_relative_human_density: float = 0.1
    density_alpha: float = 1e-3


@dataclass
class GuardrailResult:
    name: str
    passed: bool
    value: Any
    limit: Any
    detail: str = ""


class GuardrailFailure(RuntimeError):
    """One or more guardrails failed; ``report`` has every result."""

    def __init__(self, report: GuardrailReport) -> None:
        self.report = report
        failed = [r for r in report.results if not r.passed]
        super().__init__(
            "guardrail failed: "
            + "; ".join(f"{r.name} ({r.detail or f'{r.value} vs limit {r.limit}'})" for r in failed)
        )


@dataclass
class GuardrailReport:
    results: list[GuardrailResult] = field(default_factory=list)

    def add(self, name: str, passed: bool, value: Any, limit: Any, detail: str = "") -> None:
        self.results.append(GuardrailResult(name, bool(passed), value, limit, detail))

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failed_names(self) -> list[str]:
        return [r.name for r in self.results if not r.passed]

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GuardrailFailure(self)

    def to_dict(self) -> list[dict]:
        return [asdict(r) for r in self.results]


def check_training_data(prepared, split, config: GuardrailConfig = GuardrailConfig()) -> GuardrailReport:
    """Data guardrails on the train and validation days of a prepared data set."""
    report = GuardrailReport()
    idx = np.concatenate([split.train, split.validation])
    human = prepared.labels.human[idx]
    report.add("min_clicks", len(idx) >= config.min_clicks, len(idx), config.min_clicks)
    report.add(
        "min_human_labels", human.sum() >= config.min_human_labels, int(human.sum()),
        config.min_human_labels,
    )  # fmt: skip
    slices = prepared.slices[idx]
    thin = []
    for name in sorted(set(slices)):
        mask = slices == name
        if mask.sum() >= config.min_slice_clicks and human[mask].sum() < config.min_slice_human_labels:
            thin.append(f"{name}: {int(human[mask].sum())} human labels in {int(mask.sum())} clicks")
    report.add(
        "slice_human_labels", not thin, len(thin), 0,
        "; ".join(thin) if thin else "every slice has human labels",
    )  # fmt: skip
    for kind, flags in (("purchase", prepared.labels.purchasing[idx]), ("human", human)):
        report.results.append(human_density(prepared.data.clicks.ts[idx], flags, config, kind))
    finite = bool(np.isfinite(prepared.features[idx]).all())
    report.add("finite_features", finite, finite, True)
    return report


def human_density(
    ts: np.ndarray, labels: np.ndarray, config: GuardrailConfig, kind: str = "human"
) -> GuardrailResult:
    """The label-density guardrail for one kind of label (``purchase`` or ``human``)."""
    from scipy.stats import poisson

    name = f"{kind}_label_density"
    if len(ts) == 0 or not labels.any():
        return GuardrailResult(name, False, 0, config.min_relative_human_density, f"no {kind} labels at all")
    share = labels.mean()
    hour = np.floor_divide(ts, 3600).astype(np.int64)
    holes, worst = [], None
    for grouping, cell in (("hour", hour), ("hour of day", hour % 24)):
        cells, inverse = np.unique(cell, return_inverse=True)
        clicks = np.bincount(inverse).astype(np.float64)
        labelled = np.bincount(inverse, weights=labels.astype(np.float64))
        expected = share * clicks
        relative = labelled / expected
        worst = min(float(relative.min()), worst if worst is not None else np.inf)
        p = poisson.cdf(labelled, config.min_relative_human_density * expected)
        for c, n, e in zip(cells[p < config.density_alpha], labelled[p < config.density_alpha],
                           expected[p < config.density_alpha], strict=True):  # fmt: skip
            where = f"{np.datetime64(int(c) * 3600, 's')}Z" if grouping == "hour" else f"{int(c):02d}:00 UTC daily"
            holes.append(f"{where} ({int(n)} vs ~{e:.0f} expected)")
    if not holes:
        detail = f"no hour with too few {kind} labels (overall share {share:.4f})"
    else:
        detail = (
            f"{len(holes)} hours with significantly under {config.min_relative_human_density:.0%} of the "
            f"{kind} labels expected: " + ", ".join(holes[:6]) + (" ..." if len(holes) > 6 else "")
        )
    return GuardrailResult(name, not holes, round(worst, 3), config.min_relative_human_density, detail)
