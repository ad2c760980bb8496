"""``slidr simulate`` and ``slidr import``: data sets to train and stream on."""

from __future__ import annotations

import argparse
from pathlib import Path

from events.errors import UsageError
from slidr.commands.console import stage_printer

# Mapping keys that `slidr import` flags set (user_id by --user, the rest by their name).
IMPORT_FLAGS = (
    "ts",
    "ts_format",
    "user_id",
    "user_separator",
    "ip",
    "click_id",
    "session_id",
    "user_agent",
    "logged_in",
    "device",
    "ad_id",
    "advertiser_id",
    "placement",
    "query",
    "context",
    "purchase_flag",
    "purchase_time",
    "purchase_time_format",
)


def cmd_simulate(args: argparse.Namespace) -> int:
    from data.simulator import simulate

    try:
        summary = simulate(
            args.out,
            days=args.days,
            seed=args.seed,
            clicks_per_day=args.clicks_per_day,
            new_bot_day=args.new_bot_day,
            start=args.start,
            progress=stage_printer(),
            world=args.world,
        )
    except ValueError as exc:  # the simulator checks its arguments with ValueError
        raise UsageError(str(exc)) from exc
    print(summary.to_text())
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from data.importer import ColumnMapping, import_events, load_mapping, preset_mapping

    mapping = preset_mapping(args.preset) if args.preset else ColumnMapping()
    if args.mapping is not None:
        mapping = load_mapping(args.mapping, base=mapping)
    mapping = mapping.merged({key: getattr(args, key) for key in IMPORT_FLAGS}, "flags")
    report = import_events(args.src, args.out, mapping, progress=stage_printer())
    print(report.to_text())
    print(f"report: {Path(args.out) / 'import_report.json'}")
    return 0


def add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write synthetic click and purchase traffic")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory (clicks.parquet, purchases.parquet)",
    )
    p.add_argument("--days", type=int, default=4, help="days of traffic (default 4)")
    p.add_argument(
        "--seed", type=int, default=7, help="random seed; the same seed gives the same data"
    )
    p.add_argument(
        "--clicks-per-day",
        type=int,
        default=250_000,
        help="approximate clicks per day (default 250000)",
    )
    p.add_argument(
        "--new-bot-day",
        type=int,
        default=None,
        help="introduce a new robot kind ('mimic') from this day index on (drift)",
    )
    p.add_argument(
        "--start", default="2026-11-02", help="first day, YYYY-MM-DD, UTC (default 2026-11-02)"
    )
    p.add_argument(
        "--world",
        choices=("standard", "proxy_lies"),
        default="standard",
        help="traffic model; proxy_lies: purchasers are not a representative sample "
        "of humans (default standard)",
    )
    p.set_defaults(func=cmd_simulate)


def add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="import clicks from a CSV or Parquet file as a data set")
    p.add_argument(
        "src",
        type=Path,
        metavar="SRC",
        help="source file, .csv (optionally compressed) or .parquet",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output directory (clicks.parquet, purchases.parquet)",
    )
    p.add_argument(
        "--preset",
        choices=["talkingdata"],
        default=None,
        help="a built-in mapping: talkingdata = the TalkingData AdTracking layout",
    )
    p.add_argument(
        "--mapping",
        type=Path,
        default=None,
        help="JSON or TOML file of mapping keys (ts, user_id, ip, context, ...); "
        "flags override it, it overrides --preset",
    )
    p.add_argument("--ts", default=None, metavar="COL", help="click time column")
    p.add_argument(
        "--ts-format",
        default=None,
        metavar="FMT",
        help="epoch (seconds, default), epoch_ms or a strptime pattern, read as UTC",
    )
    p.add_argument(
        "--user",
        dest="user_id",
        default=None,
        metavar="COLS",
        help="user id column, or columns joined: ip+device+os",
    )
    p.add_argument(
        "--user-separator", default=None, metavar="SEP", help="joins --user columns (default -)"
    )
    p.add_argument("--ip", default=None, metavar="COL", help="client IP column")
    p.add_argument(
        "--click-id", default=None, metavar="COL", help="click id column (default: r<row number>)"
    )
    for name in (
        "session-id",
        "user-agent",
        "logged-in",
        "device",
        "ad-id",
        "advertiser-id",
        "placement",
        "query",
    ):
        p.add_argument(
            f"--{name}", default=None, metavar="COL", help=f"{name.replace('-', '_')} column"
        )
    p.add_argument(
        "--context",
        default=None,
        metavar="COLS",
        help="columns kept as context.<name> strings: app,channel",
    )
    p.add_argument(
        "--purchase-flag",
        default=None,
        metavar="COL",
        help="column that is 1/true when the click led to a purchase",
    )
    p.add_argument(
        "--purchase-time",
        default=None,
        metavar="COL",
        help="the purchase's time (default: one second after the click)",
    )
    p.add_argument(
        "--purchase-time-format", default=None, metavar="FMT", help="default: --ts-format"
    )
    p.set_defaults(func=cmd_import)


COMMANDS = {"simulate": add_simulate, "import": add_import}
