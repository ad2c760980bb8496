"""The ``slidr`` command line (SPEC §2).

``build_parser`` assembles the subcommands of the groups in ``slidr.commands``;
``main`` runs one and turns its errors into an exit code. An error slidr expects
(``events.errors.SlidrError``: a missing broker, registry, version or file, a bad flag
or setting, a refused guardrail) prints one line, ``slidr COMMAND: error: MESSAGE``,
and exits with the error's ``exit_code``; ``--debug`` or ``SLIDR_DEBUG=1`` prints its
traceback too. Any other exception is a bug, and Python prints its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from events.errors import SlidrError
from slidr.commands import data, demo, lifecycle, stack, stream, training

EXIT_INTERRUPTED = 130

GROUPS = (data, training, stack, stream, lifecycle, demo)
# `slidr --help` lists the commands in this order.
COMMAND_ORDER = (
    "simulate",
    "train",
    "evaluate",
    "score",
    "import",
    "models",
    "up",
    "down",
    "status",
    "worker",
    "produce",
    "billing",
    "promote",
    "rollback",
    "archive",
    "archive-export",
    "replay",
    "retrain",
    "monitor",
    "demo",
    "bench",
)
DEBUG_HELP = "print the traceback of an error too (also SLIDR_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slidr",
        description="Real-time detection of robotic ad clicks. Settings also come from "
        "SLIDR_* environment variables (SLIDR_KAFKA_BOOTSTRAP, SLIDR_REDIS_URL, "
        "SLIDR_REGISTRY, ...).",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adders = {name: add for group in GROUPS for name, add in group.COMMANDS.items()}
    for name in COMMAND_ORDER:
        adders[name](sub)
    for command in sub.choices.values():
        # `slidr train ... --debug` works too; SUPPRESS keeps a global --debug when absent.
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
    return parser


def debug_requested(args: argparse.Namespace) -> bool:
    """``--debug``, or ``SLIDR_DEBUG`` set to 1/true/yes/on."""
    flag = os.environ.get("SLIDR_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(getattr(args, "debug", False)) or flag


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SlidrError as exc:
        if debug_requested(args):
            traceback.print_exc()
        message = str(exc) or type(exc).__name__
        print(f"slidr {args.command}: error: {message}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"slidr {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
