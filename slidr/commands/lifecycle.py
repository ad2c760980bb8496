"""``slidr promote``, ``rollback``, ``replay``, ``retrain`` and ``monitor``: a model
version's life after training."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from events.errors import UsageError
from events.settings import Settings
from slidr.commands.checks import require_broker
from slidr.commands.console import prefixed_printer
from slidr.commands.flags import (
    model_flags,
    parse_limit,
    parse_when,
    registry_flag,
    train_options,
)

if TYPE_CHECKING:
    from lifecycle.monitor import MonitorConfig, RollbackPolicy
    from lifecycle.replay import ReplayOptions

# The help of `slidr retrain` and `slidr monitor` names the registry this way.
LIFECYCLE_REGISTRY_HELP = "model registry (default: SLIDR_REGISTRY or var/registry)"

# --- promote and rollback ------------------------------------------------------------


def cmd_promote(args: argparse.Namespace) -> int:
    from stream.control import promote

    settings = Settings.from_env()
    require_broker(settings)  # before the registry changes: the workers must hear of it
    message = promote(settings, args.version, reason=args.reason, force=args.force)
    print(
        f"active: {message['model_version']} (published to the control topic)"
        + (f"; {message['reason']}" if args.force else "")
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from stream.control import rollback

    settings = Settings.from_env()
    require_broker(settings)  # before the registry changes: the workers must hear of it
    message = rollback(settings, to=args.to, reason=args.reason, force=args.force)
    print(f"rolled back to {message['model_version']} (published to the control topic)")
    return 0


def add_promote(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "promote", help="make a registered version active; running workers switch to it"
    )
    p.add_argument("version", help="version to activate, e.g. v0002")
    p.add_argument(
        "--reason",
        default="promoted by hand",
        help="why (kept in the history and on the control topic)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="activate even though the version's guardrails did not pass (recorded in the "
        "registry and in the control message's reason)",
    )
    p.set_defaults(func=cmd_promote)


def add_rollback(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollback", help="return to the last stable version (or --to VERSION)")
    p.add_argument(
        "--to", default=None, help="version to return to (default: the newest stable one before)"
    )
    p.add_argument(
        "--reason",
        default="rolled back by hand",
        help="why (kept in the history and on the control topic)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="allow a target whose guardrails did not pass (recorded as for promote --force)",
    )
    p.set_defaults(func=cmd_rollback)


# --- replay --------------------------------------------------------------------------


def replay_options(args: argparse.Namespace) -> ReplayOptions:
    """``lifecycle.replay.ReplayOptions`` from ``slidr replay`` flags, checked."""
    from lifecycle.replay import ReplayOptions, parse_offsets, parse_time, parse_warmup

    try:
        partitions = (
            tuple(int(p) for p in args.partitions.split(",") if p.strip())
            if args.partitions
            else None
        )
    except ValueError:
        raise UsageError(
            f"--partitions: expected partition numbers P,..., got {args.partitions!r}"
        ) from None
    options = ReplayOptions(
        model_version=args.model,
        since=None if args.since is None else parse_time(args.since),
        until=None if args.until is None else parse_time(args.until),
        from_offset=parse_offsets(args.from_offset),
        to_offset=parse_offsets(args.to_offset),
        partitions=partitions,
        archive=args.archive,
        warmup_s=parse_warmup(args.warmup),
        use_logged_features=args.use_logged_features,
        missing_only=args.missing_only,
        compare=not args.no_compare,
        dry_run=args.dry_run,
        max_disorder_s=args.max_disorder,
        full_scan=args.full_scan,
    )
    options.check()
    return options


def cmd_replay(args: argparse.Namespace) -> int:
    from lifecycle.replay import run_replay

    settings = Settings.from_env(registry=args.registry)
    options = replay_options(args)
    # Only a dry run over the archive without logged features stays off the broker.
    if options.archive is None or not options.dry_run or options.use_logged_features:
        require_broker(settings)
    progress = prefixed_printer("replay", quiet=args.quiet)
    progress("settings:\n" + settings.describe())
    report = run_replay(settings, options, progress)
    print(orjson.dumps(report.to_dict()).decode() if args.json else report)
    return 0


def add_replay(sub: argparse._SubParsersAction) -> None:
    from lifecycle.replay import DEFAULT_MAX_DISORDER_S

    p = sub.add_parser(
        "replay",
        help="re-decide a range of clicks with a model version and publish replay decisions",
        description="Re-feed a range of the clicks topic (by offsets or event time) or of the "
        "archive through a model version; decisions go to the decisions topic with replay=true "
        "and supersede earlier ones for the same clicks.",
    )
    p.add_argument(
        "--since",
        default=None,
        metavar="TIME",
        help="first event time, inclusive: epoch seconds, RFC 3339 or YYYY-MM-DD (UTC)",
    )
    p.add_argument(
        "--until", default=None, metavar="TIME", help="end event time, exclusive (same forms)"
    )
    p.add_argument(
        "--from-offset",
        default=None,
        metavar="N|P:N,...",
        help="first offset of the clicks topic, for every partition or per partition",
    )
    p.add_argument(
        "--to-offset",
        default=None,
        metavar="N|P:N,...",
        help="end offset, exclusive (default: the end of the partition)",
    )
    p.add_argument(
        "--partitions",
        default=None,
        metavar="P,...",
        help="only these partitions of the clicks topic",
    )
    p.add_argument(
        "--archive",
        type=Path,
        default=None,
        metavar="DIR",
        help="read the range from this archive (slidr archive) instead of the topic",
    )
    p.add_argument(
        "--model", default=None, metavar="VERSION", help="model version (default: the active one)"
    )
    registry_flag(p)
    p.add_argument(
        "--warmup",
        default="auto",
        metavar="SECONDS|auto",
        help="fold in this much earlier traffic into the feature state first, not "
        "republished; auto (default): back to the start of the UTC day before the range's "
        "first click, as far as any feature looks, so the live version reproduces its "
        "verdicts; 0: state starts empty at the range start",
    )
    p.add_argument(
        "--use-logged-features",
        action="store_true",
        help="use the features the worker logged on features.served where present",
    )
    p.add_argument(
        "--missing-only",
        action="store_true",
        help="publish only for clicks of the range that never got a decision",
    )
    p.add_argument(
        "--no-compare",
        action="store_true",
        help="do not scan earlier decisions to count verdict changes",
    )
    p.add_argument("--dry-run", action="store_true", help="decide and summarise, publish nothing")
    p.add_argument(
        "--max-disorder",
        type=float,
        default=DEFAULT_MAX_DISORDER_S,
        metavar="SECONDS",
        help="how far out of event-time order clicks may sit in a partition (default 600)",
    )
    p.add_argument(
        "--full-scan",
        action="store_true",
        help="read whole partitions instead of bisecting for --since/--until",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_replay)


# --- retrain -------------------------------------------------------------------------


def format_history(runs: list[dict]) -> str:
    """The retrain run history (``REGISTRY/runs.jsonl``) as a fixed-width table, oldest first."""
    header = (
        f"{'when (UTC)':19}  {'outcome':8}  {'version':7}  {'active':7}  {'data':23}  "
        f"{'fingerprint':12}  guardrails / reason"
    )
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


def _retrain_progress(message: str) -> None:
    print(f"[retrain {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cmd_retrain(args: argparse.Namespace) -> int:
    from lifecycle.retrain import (
        EXIT_PROMOTED,
        EXIT_REJECTED,
        RUNS_FILE,
        RetrainOptions,
        read_runs,
        retrain,
    )
    from models.guardrails import ModelGuardrailConfig

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
        raise UsageError("give exactly one of --data DIR or --archive DIR")
    train = train_options(args)
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
        progress=_retrain_progress,
    )
    r = outcome.record
    if outcome.exit_code == EXIT_PROMOTED:
        print(f"promoted {r['version']} (was {r['active_before'] or 'none'}): {r['reason']}")
    elif outcome.exit_code == EXIT_REJECTED:
        print(
            f"slidr retrain: rejected: {r['reason']}; "
            f"active version unchanged ({r['active_after'] or 'none'})",
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


def add_retrain(sub: argparse._SubParsersAction) -> None:
    from lifecycle import retrain as retrain_job
    from models.labels import ATTRIBUTION_WINDOW_S

    p = sub.add_parser(
        "retrain",
        help="train on the last days, check guardrails, promote only if all pass",
        description=retrain_job.__doc__,
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
    registry_flag(p, LIFECYCLE_REGISTRY_HELP)
    p.add_argument(
        "--days",
        type=int,
        default=8,
        help="UTC days to train on, the last held out "
        "(default 8: the held-out weekday is also trained on)",
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
    p.add_argument("--seed", type=int, default=7, help="training seed (default 7)")
    model_flags(p)
    p.add_argument(
        "--limit",
        type=parse_limit,
        action="append",
        metavar="NAME=VALUE",
        help="a model guardrail limit, e.g. max_score_psi=0.3 "
        "(repeatable; see ModelGuardrailConfig)",
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


# --- monitor -------------------------------------------------------------------------


def monitor_config(args: argparse.Namespace) -> tuple[MonitorConfig, RollbackPolicy]:
    """The detector's ``MonitorConfig`` and the ``RollbackPolicy`` from ``slidr monitor`` flags."""
    from lifecycle.monitor import MonitorConfig, RollbackPolicy

    config = MonitorConfig(
        window_decisions=args.window,
        window_seconds=args.window_seconds,
        min_decisions=args.min_decisions,
        ivr_factor=args.ivr_factor,
        slice_ivr_factor=args.slice_ivr_factor,
        min_slice_decisions=args.min_slice_decisions,
        spike_decisions=args.spike_decisions,
        spike_share=args.spike_share,
        fpr_factor=args.fpr_factor,
        min_purchasing=args.min_purchasing,
        collapse_factor=args.collapse_factor,
        slice_collapse_factor=args.slice_collapse_factor,
        confirm_windows=args.confirm_windows,
        confirm_seconds=args.confirm_seconds,
        confirm_min_decisions=args.confirm_min_decisions,
    )
    return config, RollbackPolicy(
        enabled=not args.no_rollback, within_s=args.rollback_within_hours * 3600.0
    )


def cmd_monitor(args: argparse.Namespace) -> int:
    from lifecycle.monitor import MONITOR_LOG, Monitor

    settings = Settings.from_env(registry=args.registry)
    require_broker(settings)
    config, policy = monitor_config(args)
    print("slidr monitor settings:\n" + settings.describe(), file=sys.stderr, flush=True)
    monitor = Monitor(settings, config, policy, status_every_s=args.status_every)
    try:
        events = monitor.run(duration_s=args.duration)
    except KeyboardInterrupt:
        events = monitor.events
    rollbacks = sum(1 for e in events if e["event"] == "rollback")
    print(
        f"monitor: {len(events)} deviations, {rollbacks} rollbacks "
        f"(log: {monitor.registry.root / MONITOR_LOG})"
    )
    return 0


def add_monitor(sub: argparse._SubParsersAction) -> None:
    from lifecycle import monitor as monitor_job
    from lifecycle.monitor import MonitorConfig

    d = MonitorConfig()
    p = sub.add_parser(
        "monitor",
        help="watch live decisions; roll back a version that deviates from its promise",
        description=monitor_job.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    registry_flag(p, LIFECYCLE_REGISTRY_HELP)
    p.add_argument(
        "--window",
        type=int,
        default=d.window_decisions,
        help=f"decisions in the sliding window (default {d.window_decisions})",
    )
    p.add_argument(
        "--window-seconds",
        type=float,
        default=d.window_seconds,
        help=f"oldest decision in the window, s (default {d.window_seconds:g})",
    )
    p.add_argument(
        "--min-decisions",
        type=int,
        default=d.min_decisions,
        help=f"decisions before the IVR is judged (default {d.min_decisions})",
    )
    p.add_argument(
        "--ivr-factor",
        type=float,
        default=d.ivr_factor,
        help=f"deviation: IVR > factor x promised (default {d.ivr_factor:g})",
    )
    p.add_argument(
        "--slice-ivr-factor",
        type=float,
        default=d.slice_ivr_factor,
        help=f"... per slice (default {d.slice_ivr_factor:g})",
    )
    p.add_argument(
        "--min-slice-decisions",
        type=int,
        default=d.min_slice_decisions,
        help=f"decisions of a slice before it is judged (default {d.min_slice_decisions})",
    )
    p.add_argument(
        "--spike-decisions",
        type=int,
        default=d.spike_decisions,
        help="newest decisions checked for a spike of invalid verdicts "
        f"(default {d.spike_decisions})",
    )
    p.add_argument(
        "--spike-share",
        type=float,
        default=d.spike_share,
        help=f"invalid share that is a spike (default {d.spike_share:g})",
    )
    p.add_argument(
        "--fpr-factor",
        type=float,
        default=d.fpr_factor,
        help="deviation: FPR of purchased / high-RFM clicks > factor x promised "
        f"(default {d.fpr_factor:g})",
    )
    p.add_argument(
        "--min-purchasing",
        type=int,
        default=d.min_purchasing,
        help=f"purchased clicks before the FPR is judged (default {d.min_purchasing})",
    )
    p.add_argument(
        "--collapse-factor",
        type=float,
        default=d.collapse_factor,
        help="deviation: IVR < promised / factor (and < promised - "
        f"{d.collapse_margin:g}) (default {d.collapse_factor:g})",
    )
    p.add_argument(
        "--slice-collapse-factor",
        type=float,
        default=d.slice_collapse_factor,
        help=f"... per slice (default {d.slice_collapse_factor:g})",
    )
    p.add_argument(
        "--confirm-windows",
        type=int,
        default=d.confirm_windows,
        help="a deviation on decisions rolls back once it holds in this many consecutive "
        f"windows after it was first seen; 0: at once (default {d.confirm_windows})",
    )
    p.add_argument(
        "--confirm-seconds",
        type=float,
        default=d.confirm_seconds,
        help=f"least span of a confirmation window, s (default {d.confirm_seconds:g})",
    )
    p.add_argument(
        "--confirm-min-decisions",
        type=int,
        default=d.confirm_min_decisions,
        help="least decisions of a confirmation window, of the slice for a slice check "
        f"(default {d.confirm_min_decisions})",
    )
    p.add_argument("--no-rollback", action="store_true", help="log deviations only")
    p.add_argument(
        "--rollback-within-hours",
        type=float,
        default=0.0,
        help="roll back only versions activated at most this long before (default 0: any)",
    )
    p.add_argument(
        "--status-every", type=float, default=10.0, help="seconds between status lines (0: none)"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop after this many seconds (default 0: run until interrupted)",
    )
    p.set_defaults(func=cmd_monitor)


COMMANDS = {
    "promote": add_promote,
    "rollback": add_rollback,
    "replay": add_replay,
    "retrain": add_retrain,
    "monitor": add_monitor,
}
