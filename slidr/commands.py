"""Subcommands of the local stack, the stream and the model lifecycle (``slidr.cli``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from events.settings import Settings


def _settings(args: argparse.Namespace, **overrides) -> Settings:
    """Settings from SLIDR_* variables; flags given (not None) override them."""
    return Settings.from_env(**overrides)


# --- local stack -------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from stream.kafka import ensure_topics
    from stream.local_stack import LocalStack

    settings = _settings(args)
    info = LocalStack(settings.home).up()
    ensure_topics(settings.replace(kafka_bootstrap=info.bootstrap))
    print(f"broker  {info.bootstrap}\nredis   {info.redis_url}\nstate   {settings.home / 'stack'}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from stream.local_stack import LocalStack

    LocalStack(_settings(args).home).down()
    print("local stack stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from stream.local_stack import LocalStack

    status = LocalStack(_settings(args).home).status()
    print(status.describe())
    return 0 if status.healthy else 1


# --- stream ------------------------------------------------------------------------


def cmd_worker(args: argparse.Namespace) -> int:
    from stream.app import run_worker

    settings = _settings(
        args,
        group_id=args.group_id,
        metrics_port=args.metrics_port,
        model_version=args.model,
        batch_size=args.batch_size,
    )
    print("slidr worker settings:\n" + settings.describe(), file=sys.stderr, flush=True)
    run_worker(settings, loglevel=args.loglevel)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from stream.producer import produce_dataset

    settings = _settings(args)
    report = produce_dataset(
        settings, args.data, rate=args.rate, limit=args.limit, progress=not args.quiet
    )
    print(report)
    return 0


def cmd_billing(args: argparse.Namespace) -> int:
    from stream.billing import run_billing

    settings = _settings(args)
    run_billing(settings, data=args.data, idle_s=args.idle, follow=args.follow, top=args.top)
    return 0


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the servers a command started are stopped."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def cmd_bench(args: argparse.Namespace) -> int:
    import orjson

    _exit_on_sigterm()
    from stream.bench import BenchOptions, run_bench

    options = BenchOptions(
        offline_clicks=args.clicks,
        stream_clicks=args.stream_clicks,
        rate=args.rate,
        latency_seconds=args.seconds,
        offline=not args.stream_only,
        stream=not args.offline_only,
        transports=tuple(t.strip() for t in args.transports.split(",") if t.strip()),
    )
    report = run_bench(
        _settings(args),
        options,
        progress=lambda m: print(f"bench: {m}", file=sys.stderr, flush=True),
    )
    text = orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from slidr.demo import run_demo

    _exit_on_sigterm()
    return run_demo(args.dir, clicks_per_day=args.clicks_per_day, rate=args.rate or None)


def cmd_promote(args: argparse.Namespace) -> int:
    from stream.control import promote

    message = promote(_settings(args), args.version, reason=args.reason)
    print(f"active: {message['model_version']} (published to the control topic)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from stream.control import rollback

    message = rollback(_settings(args), to=args.to, reason=args.reason)
    print(f"rolled back to {message['model_version']} (published to the control topic)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from lifecycle.monitor import register_monitor_commands
    from lifecycle.replay import register_replay_commands
    from lifecycle.retrain import register_lifecycle_commands
    from stream.archive import register_archive_commands

    p = sub.add_parser("up", help="start the embedded broker (Tansu) and Redis (Valkey)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the embedded stack (by pid)")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", help="addresses and health of the embedded stack")
    p.set_defaults(func=cmd_status)

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
    p.add_argument("--loglevel", default="info", help="log level (default info)")
    p.set_defaults(func=cmd_worker)

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

    p = sub.add_parser(
        "promote", help="make a registered version active; running workers switch to it"
    )
    p.add_argument("version", help="version to activate, e.g. v0002")
    p.add_argument(
        "--reason",
        default="promoted by hand",
        help="why (kept in the history and on the control topic)",
    )
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="return to the last stable version (or --to VERSION)")
    p.add_argument(
        "--to", default=None, help="version to return to (default: the newest stable one before)"
    )
    p.add_argument(
        "--reason",
        default="rolled back by hand",
        help="why (kept in the history and on the control topic)",
    )
    p.set_defaults(func=cmd_rollback)

    register_archive_commands(sub)
    register_replay_commands(sub)
    register_lifecycle_commands(sub)
    register_monitor_commands(sub)

    p = sub.add_parser(
        "demo", help="the whole loop: stack, simulate, train, stream, decide, report"
    )
    p.add_argument(
        "--dir", type=Path, default=Path("var/demo"), help="working directory (default var/demo)"
    )
    p.add_argument(
        "--clicks-per-day", type=int, default=60_000, help="simulated clicks a day (default 60000)"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=5000.0,
        help="clicks/s produced to the worker; 0 = as fast as possible",
    )
    p.set_defaults(func=cmd_demo)

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
        default="aiokafka",
        help="faust-streaming Kafka drivers to measure, comma-separated: aiokafka, confluent "
        "(default aiokafka; confluent stalls before its first assignment on the embedded broker)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    p.set_defaults(func=cmd_bench)
