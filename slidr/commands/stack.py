"""``slidr up``, ``down`` and ``status``: the embedded broker (Tansu) and Redis (Valkey)."""

from __future__ import annotations

import argparse

from events.settings import Settings
from slidr.commands.checks import require_home


def cmd_up(args: argparse.Namespace) -> int:
    from stream.kafka import ensure_topics
    from stream.local_stack import LocalStack

    settings = Settings.from_env()
    info = LocalStack(require_home(settings)).up()
    ensure_topics(settings.replace(kafka_bootstrap=info.bootstrap))
    print(f"broker  {info.bootstrap}\nredis   {info.redis_url}\nstate   {settings.home / 'stack'}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from stream.local_stack import LocalStack

    LocalStack(require_home(Settings.from_env())).down()
    print("local stack stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from stream.local_stack import LocalStack

    status = LocalStack(require_home(Settings.from_env())).status()
    print(status.describe())
    return 0 if status.healthy else 1


def add_up(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start the embedded broker (Tansu) and Redis (Valkey)")
    p.set_defaults(func=cmd_up)


def add_down(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("down", help="stop the embedded stack (by pid)")
    p.set_defaults(func=cmd_down)


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="addresses and health of the embedded stack")
    p.set_defaults(func=cmd_status)


COMMANDS = {"up": add_up, "down": add_down, "status": add_status}
