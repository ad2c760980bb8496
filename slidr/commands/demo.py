"""``slidr demo``: the whole loop on one machine (``slidr.demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidr.commands.console import exit_on_sigterm


def cmd_demo(args: argparse.Namespace) -> int:
    from slidr.demo import run_demo

    exit_on_sigterm()
    return run_demo(args.dir, clicks_per_day=args.clicks_per_day, rate=args.rate or None)


def add_demo(sub: argparse._SubParsersAction) -> None:
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


COMMANDS = {"demo": add_demo}
