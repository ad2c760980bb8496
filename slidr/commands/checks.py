"""Checks a command makes before it starts work or changes anything.

They read settings and the local stack's record only (no network), so a missing broker
is one clear line at once instead of a failure after a long step (a training run, a
registry change) or a client retrying an address that was never given.
"""

from __future__ import annotations

from pathlib import Path

from events.settings import Settings, SettingsError


def require_broker(settings: Settings) -> str:
    """The Kafka bootstrap address; raises ``StackNotRunning`` naming what to set."""
    from stream.local_stack import resolve_bootstrap

    return resolve_bootstrap(settings)


def require_endpoints(settings: Settings) -> tuple[str, str]:
    """The Kafka and Redis addresses; raises ``StackNotRunning`` naming what to set."""
    from stream.local_stack import resolve_endpoints

    return resolve_endpoints(settings)


def require_home(settings: Settings) -> Path:
    """``SLIDR_HOME``, which slidr creates when missing; a ``SettingsError`` when it is a file."""
    if settings.home.exists() and not settings.home.is_dir():
        raise SettingsError(f"SLIDR_HOME={settings.home} is not a directory")
    return settings.home
