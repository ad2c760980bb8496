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

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson

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


class RetrainError(RuntimeError):
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


@dataclass
class _Rows:
    """A click or purchase file's rows, their event times, users and named clicks."""

    path: Path
    raw: object  # a pyarrow Table, or the JSONL lines
    ts: np.ndarray
    user_id: np.ndarray
    click_id: np.ndarray  # purchases: the attributed click when named, else None

    def write(self, out_dir: Path, mask: np.ndarray) -> int:
        """The rows under ``mask`` to ``out_dir`` in the source's format."""
        out = out_dir / self.path.name
        if self.path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(self.raw.filter(pa.array(mask)), out, compression="zstd")
        else:
            with out.open("wb") as handle:
                handle.writelines(line for line, k in zip(self.raw, mask, strict=True) if k)
        return int(mask.sum())


def _read_rows(path: Path) -> _Rows:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        from data.dataset import LoadReport, _strings, _ts_column

        table = pq.read_table(path)
        ts = _ts_column(table, path, LoadReport())
        return _Rows(path, table, ts, _strings(table, "user_id"), _strings(table, "click_id"))
    from events.schemas import InvalidEvent, parse_ts

    lines, ts, users, named = [], [], [], []
    with path.open("rb") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
                value = parse_ts(row.get("ts"))
            except (orjson.JSONDecodeError, InvalidEvent, AttributeError):
                row, value = {}, np.nan  # malformed: left out of every window
            lines.append(line if line.endswith(b"\n") else line + b"\n")
            ts.append(value)
            users.append(row.get("user_id"))
            named.append(row.get("click_id"))
    return _Rows(
        path,
        lines,
        np.asarray(ts, dtype=np.float64),
        np.asarray(users, dtype=object),
        np.asarray(named, dtype=object),
    )


def _source_file(directory: Path, stem: str) -> Path:
    for suffix in (".parquet", ".jsonl"):
        if (directory / f"{stem}{suffix}").exists():
            return directory / f"{stem}{suffix}"
    raise RetrainError(f"{directory}: no {stem}.parquet or {stem}.jsonl")


def late_purchases_of_window(
    clicks: _Rows, purchases: _Rows, end: float, until: float
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
    clicks = _read_rows(_source_file(source_dir, "clicks"))
    purchases = _read_rows(_source_file(source_dir, "purchases"))
    finite = clicks.ts[np.isfinite(clicks.ts)]
    if len(finite) == 0:
        raise RetrainError(f"{clicks.path}: no clicks with a valid time")
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
            f"(newest click {_day(float(finite.max()))}; now {_day(now)}, delay {delay_s / 3600:g} h)"
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
            f"--archive needs stream.archive.export_days, which this installation lacks ({exc}); use --data DIR"
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
    active_before = registry.active_version()
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
    try:
        if options.publish:
            from stream.control import promote

            promote(settings, version, reason=reason)
        else:
            registry.activate(version, reason=reason + " (not published)")
    except Exception as exc:
        return finish(
            EXIT_ERROR, "error", f"{version} passed every guardrail but promotion failed: {exc}"
        )
    record["promoted"] = True
    return finish(EXIT_PROMOTED, "promoted", reason)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parse_when(text: str) -> float:
    """Epoch seconds, or an ISO 8601 date/time (UTC unless it names a zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected epoch seconds or an ISO 8601 time, got {text!r}"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def parse_limit(text: str) -> tuple[str, float]:
    """``NAME=VALUE`` for a field of ``ModelGuardrailConfig``."""
    name, _, value = text.partition("=")
    known = {f.name for f in dataclasses.fields(ModelGuardrailConfig)}
    name = name.strip().replace("-", "_")
    if name not in known:
        raise argparse.ArgumentTypeError(
            f"unknown guardrail limit {name!r} (known: {', '.join(sorted(known))})"
        )
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: expected a number, got {value!r}") from None


def format_history(runs: list[dict]) -> str:
    """The run history as a fixed-width table, oldest first."""
    header = f"{'when (UTC)':19}  {'outcome':8}  {'version':7}  {'active':7}  {'data':23}  {'fingerprint':12}  guardrails / reason"
    lines = [header, "-" * len(header)]
    for r in runs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.get("started_at", 0)))
        w = r.get("window") or {}
        d = r.get("data") or {}
        span = (
            f"{d.get('first_day') or w.get('from')}..{d.get('last_day') or w.get('to')}"
            if w
            else "-"
        )
        fp = (d.get("fingerprint") or "-")[:12]
        guards = r.get("guardrails") or []
        failed = [g["name"] for g in guards if not g["passed"]]
        if failed:
            note = "failed: " + ", ".join(failed)
        elif guards:
            note = f"{len(guards)}/{len(guards)} passed"
        else:
            note = (r.get("reason") or "")[:80]
        lines.append(
            f"{when:19}  {r.get('outcome', '?'):8}  {r.get('version') or '-':7}  "
            f"{r.get('active_after') or '-':7}  {span:23}  {fp:12}  {note}"
        )
    return "\n".join(lines)


def _progress(message: str) -> None:
    print(f"[retrain {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cmd_retrain(args: argparse.Namespace) -> int:
    from events.settings import Settings

    settings = Settings.from_env(registry=args.registry)
    if args.history:
        runs = read_runs(settings.registry)
        if args.last:
            runs = runs[-args.last :]
        print(
            format_history(runs) if runs else f"no retrain runs in {settings.registry / RUNS_FILE}"
        )
        return 0
    if (args.data is None) == (args.archive is None):
        print(
            "slidr retrain: error: give exactly one of --data DIR or --archive DIR", file=sys.stderr
        )
        return EXIT_ERROR
    train = TrainOptions(
        fpr_budget=args.fpr_budget,
        seed=args.seed,
        max_epochs=args.epochs,
        calibration_method=args.calibration,
    )
    if args.min_coverage is not None:
        from slidr.cli import parse_min_coverage

        train = dataclasses.replace(train, min_coverage=parse_min_coverage(args.min_coverage))
    options = RetrainOptions(
        days=args.days,
        delay_s=args.delay_hours * 3600.0,
        now=args.now,
        train=train,
        model_guardrails=dataclasses.replace(ModelGuardrailConfig(), **dict(args.limit or [])),
        publish=not args.no_publish,
        keep_data=args.keep_data,
    )
    outcome = retrain(
        args.data or args.archive,
        settings,
        options,
        archive=args.archive is not None,
        work_dir=args.work_dir,
        progress=_progress,
    )
    r = outcome.record
    if outcome.exit_code == EXIT_PROMOTED:
        print(f"promoted {r['version']} (was {r['active_before'] or 'none'}): {r['reason']}")
    elif outcome.exit_code == EXIT_REJECTED:
        print(
            f"slidr retrain: rejected: {r['reason']}; active version unchanged ({r['active_after'] or 'none'})",
            file=sys.stderr,
        )
    else:
        print(
            f"slidr retrain: error: {r['reason']}; active version {r['active_after'] or 'none'}",
            file=sys.stderr,
        )
    for g in r["guardrails"]:
        print(f"  {'ok  ' if g['passed'] else 'FAIL'} {g['name']:24} {g['detail'] or g['value']}")
    print(f"run {r['run']} recorded in {settings.registry / RUNS_FILE}")
    return outcome.exit_code


def register_lifecycle_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``slidr retrain`` to the CLI's subparsers."""
    p = sub.add_parser(
        "retrain",
        help="train on the last days, check guardrails, promote only if all pass",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("data source (one of)")
    src.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data directory (clicks and purchases, Parquet or JSONL)",
    )
    src.add_argument(
        "--archive", type=Path, default=None, help="the Parquet archive (stream.archive)"
    )
    p.add_argument(
        "--registry",
        type=Path,
        default=None,
        help="model registry (default: SLIDR_REGISTRY or var/registry)",
    )
    p.add_argument(
        "--days",
        type=int,
        default=8,
        help="UTC days to train on, the last held out (default 8: the held-out weekday is also trained on)",
    )
    p.add_argument(
        "--delay-hours",
        type=float,
        default=ATTRIBUTION_WINDOW_S / 3600,
        help="attribution delay: a day is used once this long has passed after it (default 24)",
    )
    p.add_argument(
        "--now",
        type=parse_when,
        default=None,
        help="the clock, epoch seconds or ISO time (default: now); for backfills and tests",
    )
    p.add_argument(
        "--fpr-budget", type=float, default=0.02, help="overall FPR budget B (default 0.02)"
    )
    p.add_argument(
        "--min-coverage",
        default=None,
        metavar="SHARE|SLICE=SHARE,...",
        help="minimum robotic coverage per slice (default: as `slidr train`)",
    )
    p.add_argument("--calibration", choices=["quadratic", "empirical"], default="empirical")
    p.add_argument("--epochs", type=int, default=8, help="most training epochs (default 8)")
    p.add_argument("--seed", type=int, default=7, help="training seed (default 7)")
    p.add_argument(
        "--limit",
        type=parse_limit,
        action="append",
        metavar="NAME=VALUE",
        help="a model guardrail limit, e.g. max_score_psi=0.3 (repeatable; see ModelGuardrailConfig)",
    )
    p.add_argument(
        "--no-publish",
        action="store_true",
        help="activate in the registry only, without telling the workers on slidr.control",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where the window is copied (default SLIDR_HOME/retrain)",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the window's copy after the run")
    p.add_argument(
        "--history",
        action="store_true",
        help="print the run history (REGISTRY/runs.jsonl) and exit",
    )
    p.add_argument("--last", type=int, default=0, help="with --history: only the last N runs")
    p.set_defaults(func=cmd_retrain)
