"""The scheduled retrain job behind ``slidr retrain``.

One run:

1. picks the training window: the last ``days`` UTC days whose labels are complete,
   i.e. the newest day is used only once ``delay`` (the attribution delay: purchases
   arrive after their clicks) has passed after its end; purchases after
   ``window end + delay`` are left out, so a window trains the same whatever day it runs;
2. copies that window out of the source (a data directory, or the Parquet archive
   through ``stream.archive.export_days``) into a work directory;
3. trains and calibrates (``models.pipeline.run_training``) with the data guardrails
   and, before registration, the model guardrails (``models.guardrails.check_model``:
   the new version against the active one on the same held-out clicks);
4. registers the version and promotes it (``stream.control.promote``: registry plus
   ``slidr.control``) only when every guardrail passed;
5. appends one JSON line to ``REGISTRY/runs.jsonl`` (``slidr retrain --history``).

Exit codes: 0 promoted, 3 rejected by a guardrail (named in the output; the active
version is unchanged), 2 for errors (no data in the window, broker unreachable, ...).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

from data.dataset import EventRows, find_source, read_rows
from events.errors import SlidrError
from features.windows import DAY_S
from models.guardrails import (
    GuardrailFailure,
    GuardrailReport,
    HeldOut,
    ModelGuardrailConfig,
    check_model,
)
from models.labels import ATTRIBUTION_WINDOW_S
from models.pipeline import TrainOptions, fingerprint
from models.registry import ModelRegistry

EXIT_PROMOTED = 0
EXIT_ERROR = 2
EXIT_REJECTED = 3

RUNS_FILE = "runs.jsonl"

Progress = Callable[[str], None]


class RetrainError(SlidrError, RuntimeError):
    """A run that cannot train (no data in the window, unknown source); says why."""


# --------------------------------------------------------------------------------------
# The training window
# --------------------------------------------------------------------------------------


def _day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


@dataclass(frozen=True)
class DataWindow:
    """Clicks in ``[start, end)`` and purchases before ``labels_until`` (epoch seconds, UTC)."""

    start: float
    end: float
    labels_until: float

    @property
    def days(self) -> list[str]:
        return [_day(t) for t in np.arange(self.start, self.end, DAY_S)]

    def to_dict(self) -> dict:
        days = self.days
        return {
            "from": days[0] if days else None,
            "to": days[-1] if days else None,
            "days": len(days),
            "labels_until": datetime.fromtimestamp(self.labels_until, UTC).isoformat(),
        }


def training_window(
    now: float, days: int, delay_s: float, newest_click: float | None = None
) -> DataWindow:
    """The last ``days`` whole UTC days whose labels are complete at ``now``.

    A day ``[d, d + 1 day)`` is usable once ``now >= d + 1 day + delay_s``. With
    ``newest_click`` (the source's newest click time), the window ends at that click's
    day at the latest, so a source that stopped earlier still gives its last days.
    """
    if days < 3:
        raise RetrainError(
            f"--days must be at least 3 (train, validation, held-out test), got {days}"
        )
    end = np.floor((now - delay_s) / DAY_S) * DAY_S
    if newest_click is not None:
        end = min(end, np.floor(newest_click / DAY_S) * DAY_S + DAY_S)
    return DataWindow(float(end - days * DAY_S), float(end), float(end + delay_s))


def late_purchases_of_window(
    clicks: EventRows, purchases: EventRows, end: float, until: float
) -> np.ndarray:
    """Which purchases in ``[end, until)`` may belong to a click before ``end``.

    A purchase naming its click is kept (labelling looks the click up). One without is
    attributed to its user's latest click before it, so it is kept only when the user
    has no click in ``[end, purchase]``: else it belongs to a click outside the window,
    and keeping it would mark the window's last click of that user as purchasing.
    """
    late = (purchases.ts >= end) & (purchases.ts < until)
    first_after: dict[str, float] = {}
    after = np.nonzero(clicks.ts >= end)[0]
    for i in after[np.argsort(clicks.ts[after], kind="stable")]:
        first_after.setdefault(clicks.user_id[i], float(clicks.ts[i]))
    keep = late.copy()
    for j in np.nonzero(late)[0]:
        if purchases.click_id[j] is None:
            keep[j] = first_after.get(purchases.user_id[j], np.inf) > purchases.ts[j]
    return keep


def cut_window(
    source_dir: Path, out_dir: Path, now: float, days: int, delay_s: float
) -> tuple[DataWindow, dict]:
    """Copy the training window of a data directory to ``out_dir``; returns it and counts.

    Clicks in ``[start, end)``; purchases before ``end`` (earlier ones feed the RFM
    labels), and the late purchases of the window's clicks up to ``labels_until``
    (``late_purchases_of_window``).
    """
    clicks = read_rows(find_source(source_dir, "clicks"))
    purchases = read_rows(find_source(source_dir, "purchases"))
    finite = clicks.ts[np.isfinite(clicks.ts)]
    if len(finite) == 0:
        raise RetrainError(f"{clicks.source}: no clicks with a valid time")
    window = training_window(now, days, delay_s, newest_click=float(finite.max()))
    out_dir.mkdir(parents=True, exist_ok=True)
    n_clicks = clicks.write(out_dir, (clicks.ts >= window.start) & (clicks.ts < window.end))
    until = min(window.labels_until, now)
    keep = (purchases.ts < window.end) | late_purchases_of_window(
        clicks, purchases, window.end, until
    )
    n_purchases = purchases.write(out_dir, keep)
    inside = clicks.ts[(clicks.ts >= window.start) & (clicks.ts < window.end)]
    if n_clicks == 0:
        raise RetrainError(
            f"{source_dir}: no clicks in the window {window.days[0]} .. {window.days[-1]} "
            f"(newest click {_day(float(finite.max()))}; now {_day(now)}, "
            f"delay {delay_s / 3600:g} h)"
        )
    first, last = (
        (_day(float(inside.min())), _day(float(inside.max()))) if n_clicks else (None, None)
    )
    return window, {
        "clicks": n_clicks,
        "purchases": n_purchases,
        "first_day": first,
        "last_day": last,
    }


def export_archive_window(
    archive: Path, out_dir: Path, now: float, days: int, delay_s: float
) -> tuple[DataWindow, dict]:
    """The training window from the Parquet archive (``stream.archive.export_days``).

    The export reaches past the window to ``labels_until``, clicks included: the clicks
    after the window tell which late purchases belong to the window's clicks
    (``late_purchases_of_window``); ``cut_window`` then trims it. Purchases reach back
    the RFM lookback, for the human labels of high-RFM customers.
    """
    try:
        from stream.archive import export_days
    except ImportError as exc:
        raise RetrainError(
            "--archive needs stream.archive.export_days, which this installation lacks "
            f"({exc}); use --data DIR"
        ) from None
    from models.labels import RfmPolicy

    window = training_window(now, days, delay_s)
    exported = out_dir.parent / (out_dir.name + "-archive")
    export_days(
        archive,
        window.days[0],
        _day(max(window.labels_until, window.end + 1) - 1),
        exported,
        attribution_delay_s=delay_s,
        history_s=RfmPolicy().lookback_days * DAY_S,
    )
    try:
        return cut_window(exported, out_dir, now, days, delay_s)
    finally:
        shutil.rmtree(exported, ignore_errors=True)


# --------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrainOptions:
    # UTC days in the window; the last is the held-out test day. 8, so that the held-out
    # weekday also occurs in training (the features include the day of the week).
    days: int = 8
    delay_s: float = ATTRIBUTION_WINDOW_S  # labels of a day are complete this long after it
    now: float | None = None  # the clock (epoch seconds); None: the wall clock
    train: TrainOptions = field(default_factory=TrainOptions)
    model_guardrails: ModelGuardrailConfig = field(default_factory=ModelGuardrailConfig)
    publish: bool = True  # promotion also tells the workers on slidr.control
    keep_data: bool = False  # keep the window's copy in the work directory


@dataclass
class RetrainOutcome:
    """What a run did; ``record`` is its line in ``runs.jsonl``."""

    exit_code: int
    record: dict

    @property
    def promoted(self) -> bool:
        return bool(self.record.get("promoted"))


def active_scores_on(
    registry: ModelRegistry, manifest: dict, features: np.ndarray
) -> np.ndarray | None:
    """The active version's scores on the held-out features; None when its features differ."""
    from features.definitions import FEATURE_NAMES, FEATURE_SPEC_VERSION

    if manifest.get("feature_spec_version") != FEATURE_SPEC_VERSION or list(
        manifest.get("feature_names", [])
    ) != list(FEATURE_NAMES):
        return None
    scorer = registry.load(manifest["version"], prefer_gpu=False).scorer
    if len(features) == 0:
        return np.zeros(0)
    step = 65_536
    return np.concatenate(
        [scorer.score(features[i : i + step]) for i in range(0, len(features), step)]
    )


def model_check_against(registry: ModelRegistry, config: ModelGuardrailConfig):
    """The ``run_training`` hook: ``check_model`` against the registry's active version."""
    active = registry.active_version()
    manifest = registry.manifest(active) if active else None

    def check(result: dict, held_out: HeldOut) -> GuardrailReport:
        scores = (
            None if manifest is None else active_scores_on(registry, manifest, held_out.features)
        )
        return check_model(result, manifest, held_out, scores, config)

    return check


def append_run(registry_root: Path, record: dict) -> None:
    """One line per run in ``REGISTRY/runs.jsonl`` (appended whole, in one write)."""
    registry_root.mkdir(parents=True, exist_ok=True)
    with (registry_root / RUNS_FILE).open("ab") as handle:
        handle.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")


def read_runs(registry_root: Path) -> list[dict]:
    path = Path(registry_root) / RUNS_FILE
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _failed_text(results: list[dict]) -> str:
    parts = []
    for r in results:
        if not r["passed"]:
            detail = r["detail"] or "{} vs limit {}".format(r["value"], r["limit"])
            parts.append(f"{r['name']} ({detail})")
    return "; ".join(parts)


def retrain(
    source: Path,
    settings,
    options: RetrainOptions = RetrainOptions(),
    archive: bool = False,
    work_dir: Path | None = None,
    progress: Progress = print,
) -> RetrainOutcome:
    """One retrain run on ``source`` (a data directory, or the archive when ``archive``).

    ``settings`` (``events.settings.Settings``) gives the registry and, for promotion,
    the broker. Never raises for a rejection: the outcome's exit code says it.
    """
    from data.dataset import DatasetError
    from models.calibration import CalibrationError
    from models.pipeline import TrainingError, run_training
    from models.registry import RegistryError

    started = time.time()
    now = options.now if options.now is not None else started
    registry = ModelRegistry(settings.registry)
    # The new version is judged against this record; it is promoted only if the record
    # is still the same then (compare-and-set: a promotion or rollback meanwhile wins).
    record_before = registry.active_record()
    active_before = record_before.version
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(started))}-{os.getpid()}"
    record: dict = {
        "run": run_id,
        "started_at": started,
        "now": now,
        "source": f"{'archive' if archive else 'data'}:{Path(source).resolve()}",
        "delay_h": options.delay_s / 3600,
        "window": None,
        "data": None,
        "version": None,
        "active_before": active_before,
        "guardrails": [],
        "promoted": False,
    }
    base = Path(work_dir) if work_dir else settings.home / "retrain"
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=base))
    data_dir = workdir / "data"

    def finish(code: int, outcome: str, reason: str) -> RetrainOutcome:
        record.update(
            outcome=outcome,
            reason=reason,
            active_after=registry.active_version(),
            finished_at=time.time(),
            seconds=round(time.time() - started, 1),
        )
        append_run(registry.root, record)
        if not options.keep_data:
            shutil.rmtree(workdir, ignore_errors=True)
        return RetrainOutcome(code, record)

    try:
        cut = export_archive_window if archive else cut_window
        window, counts = cut(Path(source), data_dir, now, options.days, options.delay_s)
        record["window"] = window.to_dict()
        record["data"] = {**counts, "fingerprint": fingerprint(data_dir)}
        progress(
            f"window {window.days[0]} .. {window.days[-1]} (clicks on {counts['first_day']} .. "
            f"{counts['last_day']}: {counts['clicks']:,} clicks, "
            f"{counts['purchases']:,} purchases up to {record['window']['labels_until']})"
        )
        result = run_training(
            data_dir,
            registry,
            options.train,
            progress,
            model_check=model_check_against(registry, options.model_guardrails),
        )
    except GuardrailFailure as exc:
        record["guardrails"] = exc.report.to_dict()
        failed = exc.report.failed_names()
        return finish(
            EXIT_REJECTED,
            "rejected",
            f"data guardrail {', '.join(failed)} failed: {_failed_text(record['guardrails'])}; "
            "nothing trained or registered",
        )
    except (RetrainError, TrainingError, CalibrationError, DatasetError, RegistryError) as exc:
        return finish(EXIT_ERROR, "error", str(exc))
    except Exception as exc:  # recorded, then re-raised: a crash still leaves its line
        finish(EXIT_ERROR, "error", f"{type(exc).__name__}: {exc}")
        raise

    version = result["version"]
    record["version"] = version
    record["guardrails"] = result["guardrails"]
    record["metrics"] = {
        k: result["metrics"]["test"]["overall"].get(k) for k in ("ivr", "fpr", "coverage")
    }
    failed = [r["name"] for r in result["guardrails"] if not r["passed"]]
    if failed:
        return finish(
            EXIT_REJECTED,
            "rejected",
            f"model guardrail {', '.join(failed)} failed: {_failed_text(result['guardrails'])}; "
            f"{version} registered, not promoted",
        )
    reason = (
        f"retrain {run_id}: {len(result['guardrails'])} guardrails passed on "
        f"{counts['first_day']}..{counts['last_day']}"
    )
    expected = record_before.generation
    if active_before is None and result["active"] == version:
        expected += 1  # its registration made this first version active
    try:
        if options.publish:
            from stream.control import promote

            promote(settings, version, reason=reason, expected_generation=expected)
        else:
            registry.activate(
                version, reason=reason + " (not published)", expected_generation=expected
            )
    except Exception as exc:
        return finish(
            EXIT_ERROR, "error", f"{version} passed every guardrail but promotion failed: {exc}"
        )
    record["promoted"] = True
    return finish(EXIT_PROMOTED, "promoted", reason)
