"""``slidr worker``, ``produce``, ``billing``, ``archive``, ``archive-export`` and ``bench``:
the stream and what reads or measures it."""

from __future__ import annotations

import argparse
import functools
import gc
import signal
import sys
import threading
from pathlib import Path

import orjson

from events.errors import SlidrError, UsageError
from events.settings import Settings
from slidr.commands.checks import require_broker, require_endpoints
from slidr.commands.console import exit_on_sigterm, prefixed_printer
from slidr.commands.flags import archive_kinds, comma_separated

# faust-streaming's Kafka drivers that `slidr bench --transports` can measure.
FAUST_TRANSPORTS = ("aiokafka", "confluent")


def cmd_worker(args: argparse.Namespace) -> int:
    from models.registry import ModelRegistry
    from stream.app import run_worker
    from stream.supervisor import default_processes

    settings = Settings.from_env(
        group_id=args.group_id,
        metrics_port=args.metrics_port,
        model_version=args.model,
        batch_size=args.batch_size,
        worker_processes=args.processes,
    )
    # Before the settings are printed: no model version or no broker is one line.
    ModelRegistry(settings.registry).resolve(settings.model_version or None)
    require_endpoints(settings)
    print("slidr worker settings:\n" + settings.describe(), file=sys.stderr, flush=True)
    processes = settings.worker_processes or default_processes()
    if processes == 1:
        run_worker(settings, loglevel=args.loglevel)
        return 0
    return _supervise_workers(settings, processes, args.loglevel)


def _supervise_workers(settings: Settings, processes: int, loglevel: str) -> int:
    """``slidr worker --processes N`` (N > 1): N one-process workers under a supervisor."""
    from models.registry import ModelRegistry
    from stream.control import load_for_serving
    from stream.supervisor import Supervisor, run_forked, slot_environment

    # A model that cannot be served fails here, once, as a single worker's would: not
    # in every child. Not kept: the children fork from here and build their own.
    load_for_serving(ModelRegistry(settings.registry), settings.model_version or None)
    gc.collect()  # its ONNX session (and any thread of it) is gone before a fork
    # The flags reach the children as the settings they resolved to.
    shared = {
        "SLIDR_GROUP_ID": settings.group_id,
        "SLIDR_BATCH_SIZE": str(settings.batch_size),
        **({"SLIDR_MODEL_VERSION": settings.model_version} if settings.model_version else {}),
    }
    supervisor = Supervisor(
        # Forked: the worker's modules are imported here once, not at every restart.
        run_forked(functools.partial(_supervised_worker, loglevel)),
        [{**shared, **slot_environment(settings, slot)} for slot in range(processes)],
        on_event=prefixed_printer("slidr worker supervisor"),
    )
    return supervisor.run()


def _supervised_worker(loglevel: str) -> int:
    """One worker process under the supervisor (a forked child); its exit code."""
    from stream.app import run_worker

    try:
        run_worker(Settings.from_env(), loglevel=loglevel)
    except SlidrError as exc:
        print(f"slidr worker: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from stream.producer import produce_dataset

    settings = Settings.from_env()
    require_broker(settings)
    report = produce_dataset(
        settings, args.data, rate=args.rate, limit=args.limit, progress=not args.quiet
    )
    print(report)
    return 0


def cmd_billing(args: argparse.Namespace) -> int:
    from stream.billing import run_billing

    settings = Settings.from_env()
    require_broker(settings)
    ledger = run_billing(
        settings,
        data=args.data,
        idle_s=args.idle,
        follow=args.follow,
        on_tick=lambda grown: print(grown.render(args.top), "\n", flush=True),
    )
    print(ledger.render(args.top))
    return 0


def cmd_archive(args: argparse.Namespace) -> int:
    from stream.archive import TOPIC_OF, ArchiveOptions, run_archive
    from stream.kafka import ensure_topics

    settings = Settings.from_env()
    require_broker(settings)
    out = args.out or settings.home / "archive"
    options = ArchiveOptions(
        out=out,
        group_id=args.group_id,
        kinds=args.kinds,
        idle_s=None if args.follow or args.idle is None else args.idle,
        flush_interval_s=args.flush_interval,
        max_buffered=args.batch,
    )
    progress = prefixed_printer("archive", quiet=args.quiet)
    progress("settings:\n" + settings.describe())
    ensure_topics(settings, [TOPIC_OF[k] for k in options.kinds])
    # SIGTERM and Ctrl-C end the loop between batches: the buffered events are written
    # and their offsets committed before exiting.
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        report = run_archive(settings, options, progress, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(orjson.dumps(report.to_dict()).decode() if args.json else report)
    return 0


def cmd_archive_export(args: argparse.Namespace) -> int:
    from features.windows import DAY_S
    from stream.archive import export_days

    settings = Settings.from_env()
    archive = args.archive or settings.home / "archive"
    if not archive.is_dir():
        raise UsageError(
            f"no archive at {archive}: give --archive DIR, or fill one with `slidr archive`"
        )
    counts = export_days(
        archive,
        args.start_day,
        args.end_day or args.start_day,
        args.out,
        attribution_delay_s=args.attribution_delay * 3600.0,
        history_s=args.history_days * DAY_S,
        include_decisions=args.with_decisions,
    )
    print(f"{args.out}: " + ", ".join(f"{n:,} {kind}" for kind, n in counts.items()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    exit_on_sigterm()
    if args.adversarial:
        return _bench_adversarial(args)
    if args.restart or args.scaling is not None:
        return _bench_fleet(args)
    if args.restore:
        return _bench_restore(args)
    from stream.bench import BenchOptions, run_bench

    options = BenchOptions(
        offline_clicks=args.clicks,
        stream_clicks=args.stream_clicks,
        rate=args.rate,
        latency_seconds=args.seconds,
        offline=not args.stream_only,
        stream=not args.offline_only,
        transports=args.transports,
        scaling_processes=args.scaling or 0,
    )
    settings = Settings.from_env()
    if options.stream and not (settings.kafka_bootstrap and settings.redis_url):
        _require_local_stack_binaries()  # before the offline part, which takes minutes
    report = run_bench(
        settings,
        options,
        progress=_bench_progress,
    )
    return _print_report(report, args.out)


def _bench_progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _print_report(report: dict, out: Path | None) -> int:
    """A benchmark's JSON report on stdout, and in ``--out`` when given."""
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if out:
        out.write_text(text + "\n")
    return 0


def _bench_adversarial(args: argparse.Namespace) -> int:
    """``slidr bench --adversarial``: phases of hostile traffic in process."""
    from stream.bench_adversarial import AdversarialOptions, run_adversarial_bench

    if args.phases < 1 or args.phase_clicks < 100:
        raise UsageError("--phases must be at least 1 and --phase-clicks at least 100")
    settings = Settings.from_env()
    if not settings.redis_url:
        _require_local_stack_binaries()
    report = run_adversarial_bench(
        settings,
        AdversarialOptions(phases=args.phases, phase_clicks=args.phase_clicks),
        progress=_bench_progress,
    )
    return _print_report(report, args.out)


def _bench_fleet(args: argparse.Namespace) -> int:
    """``slidr bench --restart`` / ``--scaling N``: recovery after kill -9, 1 against N
    worker processes."""
    from stream.bench_fleet import FleetBenchOptions, run_fleet_bench
    from stream.supervisor import default_processes

    if args.restart < 0 or (args.scaling or 0) < 0:
        raise UsageError("--restart and --scaling take a positive number")
    settings = Settings.from_env()
    if not (settings.kafka_bootstrap and settings.redis_url):
        _require_local_stack_binaries()
    options = FleetBenchOptions(
        restart_runs=args.restart,
        memberships=args.memberships,
        scaling_processes=0 if args.scaling is None else args.scaling or default_processes(),
        scaling_clicks=args.stream_clicks,
    )
    report = run_fleet_bench(settings, options, progress=_bench_progress)
    return _print_report(report, args.out)


def _bench_restore(args: argparse.Namespace) -> int:
    """``slidr bench --restore USERS``: restore time of a changelog partition."""
    from stream.bench_restore import run_restore_bench

    if args.restore < 1:
        raise UsageError("--restore takes a positive number of users")
    settings = Settings.from_env()
    if not settings.kafka_bootstrap:
        _require_local_stack_binaries()
    report = run_restore_bench(
        settings,
        args.restore,
        progress=_bench_progress,
    )
    return _print_report(report, args.out)


def _require_local_stack_binaries() -> None:
    """Raise ``StackError`` naming what to install when the embedded stack cannot start."""
    from stream.local_stack import broker_binary, redis_binary

    broker_binary()
    redis_binary()


def faust_transports(text: str) -> tuple[str, ...]:
    """``aiokafka,confluent`` (``slidr bench --transports``)."""
    transports = comma_separated(text)
    unknown = [t for t in transports if t not in FAUST_TRANSPORTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"expected some of {','.join(FAUST_TRANSPORTS)}, got {text!r}"
        )
    return transports


def group_memberships(text: str) -> tuple[str, ...]:
    """``dynamic,fenced,static`` (``slidr bench --memberships``)."""
    from events.settings import GROUP_MEMBERSHIPS

    modes = comma_separated(text)
    if not modes or any(m not in GROUP_MEMBERSHIPS for m in modes):
        raise argparse.ArgumentTypeError(
            f"expected some of {','.join(GROUP_MEMBERSHIPS)}, got {text!r}"
        )
    return modes


def add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run the stream processor (Faust worker)")
    p.add_argument(
        "--group-id", default=None, help="consumer group (default $SLIDR_GROUP_ID or slidr-worker)"
    )
    p.add_argument(
        "--model", default=None, help="pin a model version (default: the registry's active one)"
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="clicks per micro-batch (default 500)"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="worker processes on this host, one group member each, under a supervisor that "
        "restarts a crashed one (default $SLIDR_WORKER_PROCESSES or one per core)",
    )
    p.add_argument("--loglevel", default="info", help="log level (default info)")
    p.set_defaults(func=cmd_worker)


def add_produce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("produce", help="publish a data set's clicks and purchases in time order")
    p.add_argument("--data", type=Path, required=True, help="data directory (clicks and purchases)")
    p.add_argument(
        "--rate", type=float, default=None, help="events per second (default: as fast as possible)"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="publish only the first N clicks (and purchases up to then)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_produce)


def add_billing(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "billing", help="example billing consumer: billable vs invalid clicks per advertiser"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="data directory to map click_id to advertiser (default: use the decision only)",
    )
    p.add_argument(
        "--idle", type=float, default=5.0, help="stop after this many seconds without decisions"
    )
    p.add_argument(
        "--follow", action="store_true", help="keep running (print totals every few seconds)"
    )
    p.add_argument("--top", type=int, default=15, help="advertisers to print (default 15)")
    p.set_defaults(func=cmd_billing)


def add_archive(sub: argparse._SubParsersAction) -> None:
    from stream.archive import KINDS

    p = sub.add_parser(
        "archive",
        help="archive clicks, purchases and decisions from Kafka into hourly Parquet files",
        description="Consume the clicks, purchases and decisions topics (consumer group of its "
        "own) into OUT/<kind>/date=YYYY-MM-DD/hour=HH/part-<uuid>.parquet, partitioned by event "
        "time. Each event is written once, also when re-consumed after a crash or restart.",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="archive directory (default $SLIDR_HOME/archive)"
    )
    p.add_argument(
        "--group-id", default="slidr-archive", help="consumer group (default slidr-archive)"
    )
    p.add_argument(
        "--kinds",
        type=archive_kinds,
        default=KINDS,
        help="what to archive, comma-separated (default clicks,purchases,decisions)",
    )
    stop = p.add_mutually_exclusive_group()
    stop.add_argument(
        "--idle",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this many seconds without messages (default: run forever)",
    )
    stop.add_argument("--follow", action="store_true", help="run until interrupted (the default)")
    p.add_argument(
        "--flush-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="write files and commit offsets at least this often (default 10)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=50_000,
        metavar="EVENTS",
        help="write earlier when this many events are buffered (default 50000)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--json", action="store_true", help="print the final report as JSON")
    p.set_defaults(func=cmd_archive)


def add_archive_export(sub: argparse._SubParsersAction) -> None:
    from stream.archive import DEFAULT_ATTRIBUTION_DELAY_S

    p = sub.add_parser(
        "archive-export",
        help="write a data set directory (clicks.parquet, purchases.parquet) from archived days",
    )
    p.add_argument(
        "--archive", type=Path, default=None, help="archive directory (default $SLIDR_HOME/archive)"
    )
    p.add_argument("--start-day", required=True, help="first day, YYYY-MM-DD (UTC)")
    p.add_argument("--end-day", default=None, help="last day, inclusive (default: the start day)")
    p.add_argument("--out", type=Path, required=True, help="output data set directory")
    p.add_argument(
        "--attribution-delay",
        type=float,
        default=DEFAULT_ATTRIBUTION_DELAY_S / 3600,
        metavar="HOURS",
        help="purchases up to this long after the last day (default 24)",
    )
    p.add_argument(
        "--history-days",
        type=float,
        default=0.0,
        help="purchases this many days before the first day, for RFM (default 0)",
    )
    p.add_argument("--with-decisions", action="store_true", help="also write decisions.parquet")
    p.set_defaults(func=cmd_archive_export)


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="throughput and latency of the scoring path and the whole pipeline"
    )
    p.add_argument(
        "--clicks",
        type=int,
        default=1_000_000,
        help="simulated clicks for the offline figures (default 1M)",
    )
    p.add_argument(
        "--stream-clicks",
        type=int,
        default=100_000,
        help="clicks for the stream throughput run (default 100k)",
    )
    p.add_argument(
        "--rate", type=float, default=2000.0, help="clicks/s for the latency run (default 2000)"
    )
    p.add_argument(
        "--seconds", type=float, default=30.0, help="length of the latency run (default 30)"
    )
    p.add_argument("--offline-only", action="store_true", help="only featurization and training")
    p.add_argument("--stream-only", action="store_true", help="only the stream benchmarks")
    p.add_argument(
        "--transports",
        type=faust_transports,
        default=FAUST_TRANSPORTS[:1],
        help="faust-streaming Kafka drivers to measure, comma-separated: aiokafka, confluent "
        "(default aiokafka; confluent stalls before its first assignment on the embedded broker)",
    )
    p.add_argument(
        "--adversarial",
        action="store_true",
        help="instead: hostile traffic (unique long agents, rotating ids, wide contexts) "
        "through the engine in phases, cost and state per phase",
    )
    p.add_argument("--phases", type=int, default=5, help="with --adversarial (default 5)")
    p.add_argument(
        "--phase-clicks", type=int, default=20_000, help="with --adversarial (default 20k)"
    )
    p.add_argument(
        "--restart",
        type=int,
        default=0,
        metavar="RUNS",
        help="instead: kill -9 a worker RUNS times, restart it at once, and report the "
        "seconds to its first decision for each --memberships mode",
    )
    p.add_argument(
        "--memberships",
        type=group_memberships,
        default=("dynamic", "fenced"),
        help="with --restart: SLIDR_GROUP_MEMBERSHIP modes to measure, comma-separated "
        "(default dynamic,fenced: before and after)",
    )
    p.add_argument(
        "--scaling",
        type=int,
        nargs="?",
        const=0,
        default=None,
        metavar="N",
        help="instead: --stream-clicks decided by 1 worker process and by N (default one "
        "per core), the ratio, and the CPU shares of the broker, Redis and the workers "
        "(the stream benchmarks report it too)",
    )
    p.add_argument(
        "--restore",
        type=int,
        default=0,
        metavar="USERS",
        help="instead: write USERS user records and as many decided clicks to a state "
        "changelog partition, and time restoring them (whole, then a 1%% tail)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    p.set_defaults(func=cmd_bench)


COMMANDS = {
    "worker": add_worker,
    "produce": add_produce,
    "billing": add_billing,
    "archive": add_archive,
    "archive-export": add_archive_export,
    "bench": add_bench,
}
