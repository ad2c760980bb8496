"""The offline job behind ``slidr train``: data -> features -> labels -> models ->
calibration -> guardrails -> export -> report -> registry.

The data set is split by event-time day: the last day is held out for evaluation, the
day before it calibrates the thresholds and stops training early, and every earlier day
trains. Ground truth columns (``is_bot``), when present, are used only for reporting.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from features.batch import compute_features
from features.definitions import FEATURE_NAMES, FEATURE_SPEC_VERSION, N_FEATURES
from features.windows import DAY_S
from models import calibration, metrics
from models.dataset import Dataset, load_dataset
from models.guardrails import GuardrailReport, HeldOut, check_training_data
from models.labels import Labels, balancing_weights, make_labels, rfm_snapshot
from models.registry import ModelRegistry

Progress = Callable[[str], None]
# Model guardrails run before registration: (training summary, held-out day) -> report.
ModelCheck = Callable[[dict, HeldOut], GuardrailReport]


class TrainingError(RuntimeError):
    """Training cannot run on this data set; the message says why."""


@dataclass(frozen=True)
class TrainOptions:
    fpr_budget: float = 0.02  # overall FPR budget B on purchasing clicks (SPEC §5)
    # Minimum robotic coverage C_s per slice (a float applies to every slice). The default
    # asks it where robotic sessions are mostly robots on simulated traffic; in slices
    # without robots the "robotic" sessions are heavy human users, and a minimum there
    # would only spend the FPR budget on humans. Set it per deployment.
    min_coverage: float | dict[str, float] = field(
        default_factory=lambda: {"desktop/logged_out": 0.8, "mobile/logged_out": 0.7}
    )
    robotic_k: int = 10  # sessions with more than k clicks within an hour are robotic
    # "empirical" solves exactly on the empirical curves; "quadratic" is SLIDR's concave fit.
    # On simulated traffic the fit loses ~1.5 IVR points (see the report), so exact is default.
    calibration_method: str = "empirical"
    min_slice_purchases: int = 50
    seed: int = 7
    max_epochs: int = 8


@dataclass
class Split:
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    days: list[str] = field(default_factory=list)


def split_by_day(ts: np.ndarray) -> Split:
    """Earlier days train, the second-to-last day validates, the last day tests."""
    day = np.floor_divide(ts, DAY_S).astype(np.int64)
    days = np.unique(day)
    if len(days) < 3:
        raise TrainingError(
            f"need clicks on at least 3 days (train, validation, held-out test); got {len(days)}"
        )
    names = [time.strftime("%Y-%m-%d", time.gmtime(int(d) * DAY_S)) for d in days]
    return Split(
        np.nonzero(day < days[-2])[0],
        np.nonzero(day == days[-2])[0],
        np.nonzero(day == days[-1])[0],
        names,
    )


def fingerprint(directory: Path) -> str:
    """SHA-256 over the data files' names, sizes and bytes."""
    digest = hashlib.sha256()
    for path in sorted(directory.glob("*")):
        if path.suffix in (".parquet", ".jsonl") and path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Prepared:
    """Everything derived from a data set before any model is fitted."""

    data: Dataset
    features: np.ndarray
    slices: np.ndarray
    labels: Labels
    robotic: np.ndarray
    is_bot: np.ndarray | None
    seconds: dict[str, float]


def prepare(directory: Path, options: TrainOptions, progress: Progress) -> Prepared:
    seconds = {}
    started = time.perf_counter()
    data = load_dataset(directory)
    seconds["load"] = time.perf_counter() - started
    progress(f"loaded {data.report.to_text()}")
    if len(data.clicks) == 0:
        raise TrainingError(f"{directory}: no valid clicks")
    started = time.perf_counter()
    features, slices = compute_features(data.clicks)
    seconds["features"] = time.perf_counter() - started
    progress(
        f"features: {len(features):,} clicks x {N_FEATURES} in {seconds['features']:.1f} s "
        f"({len(features) / max(seconds['features'], 1e-9):,.0f} clicks/s)"
    )
    started = time.perf_counter()
    labels = make_labels(data.clicks, data.purchases)
    robotic = metrics.robotic_sessions(data.clicks.session_id, data.clicks.ts, k=options.robotic_k)
    seconds["labels"] = time.perf_counter() - started
    summary = labels.summary()
    progress(
        f"labels: {summary['purchasing_clicks']:,} purchasing, {summary['high_rfm_clicks']:,} "
        f"high-RFM, {summary['human_labelled']:,} human of {summary['clicks']:,} clicks"
    )
    is_bot = data.clicks.extra.get("is_bot")
    return Prepared(
        data, features, slices, labels, robotic,
        None if is_bot is None else is_bot.astype(bool), seconds,
    )  # fmt: skip


def _baseline_row(
    name: str, scores: np.ndarray, p: Prepared, idx: np.ndarray, fpr: float
) -> dict:
    """A model's figures on the held-out day with one global threshold at overall FPR ``fpr``."""
    purchasing = p.labels.purchasing[idx]
    threshold = metrics.threshold_for_fpr(scores, purchasing, fpr)
    invalid = scores >= threshold
    figures = metrics.compute_metrics(
        invalid, purchasing, p.robotic[idx], p.slices[idx],
        None if p.is_bot is None else p.is_bot[idx],
    )["overall"]  # fmt: skip
    # Scores with ties cannot hit an FPR exactly: also read the IVR at exactly ``fpr`` off
    # the curve (linear interpolation, i.e. randomising at the tied threshold).
    c = metrics.curve(scores, purchasing, p.robotic[idx])
    ivr_at = float(np.interp(fpr, np.nan_to_num(c.fpr, nan=0.0), c.ivr))
    row = {"model": name, "ivr_at_equal_fpr": ivr_at, "threshold": float(threshold), **figures}
    if p.is_bot is not None:
        row["bot_recall_at_1pct_human_fpr"] = metrics.recall_at_human_fpr(scores, p.is_bot[idx], 0.01)
    return row


def run_training(
    directory: Path | str,
    registry: ModelRegistry,
    options: TrainOptions = TrainOptions(),
    progress: Progress = print,
    model_check: ModelCheck | None = None,
) -> dict:
    """Train, calibrate, check and register a version; returns a summary dict.

    Raises ``GuardrailFailure`` (from models.guardrails) when a guardrail rejects the
    data: nothing is registered then. ``model_check`` (e.g. ``models.lifecycle``'s
    comparison with the active version) runs before registration; its results join
    ``result["guardrails"]`` and a version it rejects is registered but never becomes
    active by itself (``result["model_guardrails"]["passed"]`` is False).
    """
    # torch is imported here so that serving-only installs can import this package.
    import torch

    from models.export import export_onnx, max_export_error
    from models.report import write_report
    from models.training import (
        TrainConfig,
        fit,
        logistic,
        mlp,
        predict,
        unseen_weekday_mask,
        velocity_scores,
    )

    total_started = time.perf_counter()
    directory = Path(directory)
    p = prepare(directory, options, progress)
    split = split_by_day(p.data.clicks.ts)
    progress(
        f"split: train {len(split.train):,} clicks ({', '.join(split.days[:-2])}), "
        f"validation {len(split.validation):,} ({split.days[-2]}), test {len(split.test):,} ({split.days[-1]})"
    )
    guardrails: GuardrailReport = check_training_data(p, split)
    guardrails.raise_if_failed()

    y = p.labels.robot
    weights = balancing_weights(p.data.clicks.ts, p.data.clicks.logged_in, y)
    tr, va, te = split.train, split.validation, split.test
    x = p.features
    mean = x[tr].mean(axis=0)
    std = x[tr].std(axis=0)
    config = TrainConfig(seed=options.seed, max_epochs=options.max_epochs)

    mask = unseen_weekday_mask(p.data.clicks.ts[tr], FEATURE_NAMES)
    masked = [n for n, m in zip(FEATURE_NAMES, mask, strict=True) if m == 0]
    if masked:
        progress(f"training covers fewer than 7 weekdays: inputs {masked} switched off")
    progress("training MLP")
    # Seed the initial weights too (fit seeds only the batch order): torch's default
    # seed differs per process, so without this the same data gave different models.
    torch.manual_seed(config.seed)
    model = mlp(N_FEATURES, mean, std, config, mask)
    mlp_log = fit(model, x[tr], y[tr], weights[tr], x[va], y[va], weights[va], config, progress)
    progress("training logistic regression")
    torch.manual_seed(config.seed)
    lr_model = logistic(N_FEATURES, mean, std, mask)
    lr_log = fit(lr_model, x[tr], y[tr], weights[tr], x[va], y[va], weights[va], config)

    scores = {
        "mlp": predict(model, x),
        "logistic_regression": predict(lr_model, x),
        "velocity_heuristic": velocity_scores(x),
    }

    progress("calibrating slice thresholds")
    cal = calibration.calibrate_slices(
        scores["mlp"][va], p.slices[va], p.labels.purchasing[va], p.robotic[va],
        budget=options.fpr_budget, min_coverage=options.min_coverage,
        method=options.calibration_method, min_purchases=options.min_slice_purchases,
    )  # fmt: skip
    other_method = "empirical" if options.calibration_method == "quadratic" else "quadratic"
    try:
        alt = calibration.calibrate_slices(
            scores["mlp"][va], p.slices[va], p.labels.purchasing[va], p.robotic[va],
            budget=options.fpr_budget, min_coverage=options.min_coverage,
            method=other_method, min_purchases=options.min_slice_purchases,
        )  # fmt: skip
    except calibration.CalibrationError:
        alt = None

    # Held-out day: the slice thresholds against one global threshold at the same FPR.
    test_scores = scores["mlp"][te]
    test_invalid = calibration.apply_thresholds(
        test_scores, p.slices[te], cal.thresholds, cal.default_threshold
    )
    test_metrics = metrics.compute_metrics(
        test_invalid, p.labels.purchasing[te], p.robotic[te], p.slices[te],
        None if p.is_bot is None else p.is_bot[te],
    )  # fmt: skip
    comparison = calibration.compare_with_global(
        cal, test_scores, p.slices[te], p.labels.purchasing[te], p.robotic[te]
    )
    realised_fpr = test_metrics["overall"]["fpr"] or 0.0
    baselines = [
        _baseline_row(name, s[te], p, te, realised_fpr) for name, s in scores.items()
    ]
    validation_metrics = metrics.compute_metrics(
        calibration.apply_thresholds(scores["mlp"][va], p.slices[va], cal.thresholds, cal.default_threshold),
        p.labels.purchasing[va], p.robotic[va], p.slices[va],
        None if p.is_bot is None else p.is_bot[va],
    )  # fmt: skip

    staging = registry.staging_dir()
    progress("exporting ONNX")
    export_onnx(model, N_FEATURES, staging / "model.onnx")
    export_error = max_export_error(model, staging / "model.onnx", x[te][:4096])
    if export_error > 1e-5:
        raise TrainingError(f"ONNX scores differ from torch by {export_error:.2e} (> 1e-5)")

    thresholds = {
        "slices": cal.thresholds,
        "default": cal.default_threshold,
        "fpr_budget": options.fpr_budget,
        "method": cal.method,
    }
    (staging / "thresholds.json").write_bytes(orjson.dumps(thresholds, option=orjson.OPT_INDENT_2))
    snapshot = rfm_snapshot(p.data.purchases, float(p.data.clicks.ts.max()) + 1.0)
    pq.write_table(pa.table(snapshot), staging / "rfm_snapshot.parquet", compression="zstd")
    curves = {
        s: metrics.curve(
            test_scores[p.slices[te] == s], p.labels.purchasing[te][p.slices[te] == s],
            p.robotic[te][p.slices[te] == s],
            None if p.is_bot is None else p.is_bot[te][p.slices[te] == s],
        )
        for s in sorted(set(p.slices[te]))
    }  # fmt: skip
    result = {
        "feature_spec_version": FEATURE_SPEC_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "data": {
            "directory": str(directory.resolve()),
            "fingerprint": fingerprint(directory),
            "days": split.days,
            "clicks": {"train": len(tr), "validation": len(va), "test": len(te)},
            "load": p.data.report.to_text(),
        },
        "labels": p.labels.summary(),
        "train_config": config.to_dict(),
        "masked_features": masked,
        "options": {**options.__dict__},
        "fit": {"mlp": mlp_log.__dict__, "logistic_regression": lr_log.__dict__},
        "export_max_abs_error": export_error,
        "calibration": cal.to_dict(),
        "calibration_alternative": alt.to_dict() if alt is not None else None,
        "global_comparison": comparison,
        "baselines": baselines,
        "metrics": {"test": test_metrics, "validation": validation_metrics},
        "guardrails": guardrails.to_dict(),
        "timings_s": {**p.seconds},
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.python_version()}".strip(),
    }
    model_report = None
    if model_check is not None:
        progress("model guardrails")
        model_report = model_check(
            result, HeldOut(x[te], p.slices[te], p.labels.purchasing[te], test_scores, test_invalid)
        )
        result["guardrails"] = result["guardrails"] + model_report.to_dict()
        result["model_guardrails"] = {"passed": model_report.passed, "failed": model_report.failed_names()}
    progress("writing report")
    write_report(staging, result, curves)
    result["timings_s"]["total"] = time.perf_counter() - total_started
    metrics_doc = {k: result[k] for k in ("metrics", "baselines", "global_comparison", "calibration", "labels")}
    (staging / "metrics.json").write_bytes(
        orjson.dumps(metrics_doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    version = registry.register(
        staging, result, activate_first=model_report is None or model_report.passed
    )
    result["version"] = version
    result["active"] = registry.active_version()
    return result
