"""Shared fixtures: the embedded stack for integration tests, isolated topics per test.

A test that requests ``stack`` (directly or through ``stream_settings``) is marked
``integration`` automatically, so ``pytest -m "not integration"`` runs the unit tests
alone. The stack starts once per session, only if some selected test needs it, listens
on 127.0.0.1 only, and is stopped by pid at the end.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from events.settings import Settings


@dataclass(frozen=True)
class RunningStack:
    """The session's local stack: addresses, its home, and settings pointing at it."""

    bootstrap: str  # 127.0.0.1:PORT
    redis_url: str  # redis://127.0.0.1:PORT/0
    home: Path
    settings: Settings  # kafka_bootstrap, redis_url and home set; no topic prefix
    cluster_id: str  # the broker's Kafka cluster id (unique per start)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """Tansu and Valkey for the whole session; skipped when the binaries are missing."""
    from stream.local_stack import LocalStack, StackError, broker_binary, redis_binary

    try:
        broker_binary()
        redis_binary()
    except StackError as exc:
        pytest.skip(f"embedded stack unavailable: {exc}")
    home = tmp_path_factory.mktemp("slidr-home")
    local = LocalStack(home)
    info = local.up()
    try:
        yield RunningStack(
            bootstrap=info.bootstrap,
            redis_url=info.redis_url,
            home=home,
            settings=Settings(
                home=home,
                kafka_bootstrap=info.bootstrap,
                redis_url=info.redis_url,
                registry=home / "registry",
            ),
            cluster_id=info.cluster_id,
        )
    finally:
        local.down()


@pytest.fixture
def stream_settings(stack: RunningStack) -> Settings:
    """The stack's settings with a topic prefix of this test's own, topics created.

    Tansu keeps every topic until the session's broker stops, so a fresh prefix is
    what keeps one test from reading another's records.
    """
    from stream.kafka import ensure_topics

    settings = stack.settings.replace(topic_prefix=f"t{uuid.uuid4().hex[:12]}-")
    ensure_topics(settings)
    return settings


@pytest.fixture(autouse=True)
def _no_slidr_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the developer's SLIDR_* variables: no test may reach a real cluster."""
    for name in list(os.environ):
        if name.startswith("SLIDR_"):
            monkeypatch.delenv(name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "stack" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
