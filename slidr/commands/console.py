"""What commands share about running in a terminal: progress lines and signals."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable

Progress = Callable[[str], None]


def stage_printer() -> Progress:
    """Progress lines on stderr, each stamped with the seconds since the command began."""
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    return progress


def prefixed_printer(prefix: str, quiet: bool = False) -> Progress:
    """Progress lines on stderr as ``PREFIX: message``; nothing when ``quiet``."""

    def progress(message: str) -> None:
        if not quiet:
            print(f"{prefix}: {message}", file=sys.stderr, flush=True)

    return progress


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the servers a command started are stopped."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
