"""The faust-streaming internals that ``stream.faust_compat`` relies on are still there.

Pure unit tests (no broker): each fails loudly when a faust-streaming upgrade moves,
renames or re-signs a name the compat module overrides, wraps or reads.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiokafka
import faust
import pytest
from faust.tables.manager import TableManager
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.drivers import confluent as faust_confluent

from stream.faust_compat import (
    CONSUMER_PRIVATE_ATTRIBUTES,
    FAUST_VERSION,
    RECORDED_SIGNATURES,
    BatchDrain,
    BatchingApp,
    PromptTableManager,
    group_member_id,
)

RECHECK = (
    "re-check every patch listed in stream/faust_compat.py's docstring against the "
    "installed faust-streaming before changing FAUST_VERSION or RECORDED_SIGNATURES"
)
UNREACHABLE_BROKER = "127.0.0.1:1"  # nothing connects in these tests


def resolve(dotted: str) -> Any:
    """``"package.module:Class.attribute"`` -> the attribute as faust defines it."""
    module_name, _, qualname = dotted.partition(":")
    owner: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        assert hasattr(owner, part), f"{dotted}: faust-streaming has no {part!r}; {RECHECK}"
        owner = getattr(owner, part)
    return inspect.unwrap(owner)  # faust's own function, not slidr's wrapper around it


def without_annotations(function: Any) -> inspect.Signature:
    signature = inspect.signature(function)
    return signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=inspect.Signature.empty,
    )


def test_installed_faust_streaming_is_the_version_the_patches_were_written_for():
    installed = version("faust-streaming")
    assert installed == FAUST_VERSION, (
        f"faust-streaming {installed} is installed, the patches target {FAUST_VERSION}: {RECHECK}"
    )


def test_pyproject_pins_faust_streaming_to_that_version():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("faust-streaming")]
    assert pins == [f"faust-streaming=={FAUST_VERSION}"]


@pytest.mark.parametrize("dotted", sorted(RECORDED_SIGNATURES))
def test_patched_name_keeps_its_recorded_signature(dotted):
    found = str(without_annotations(resolve(dotted)))
    assert found == RECORDED_SIGNATURES[dotted], (
        f"{dotted} is now {found}, recorded {RECORDED_SIGNATURES[dotted]}: {RECHECK}"
    )


@pytest.mark.parametrize(
    ("override", "dotted"),
    [
        (BatchDrain._drain_messages, "faust.transport.consumer:Consumer._drain_messages"),
        (BatchingApp._new_transport, "faust.app.base:App._new_transport"),
    ],
)
def test_overrides_take_the_parameters_faust_calls_them_with(override, dotted):
    assert without_annotations(override) == without_annotations(resolve(dotted))


def _apps(tmp_path: Path, broker: str) -> tuple[faust.App, faust.App]:
    """A BatchingApp with a 20 ms fetch wait and a plain faust.App, same broker."""
    common = dict(
        broker=f"{broker}://{UNREACHABLE_BROKER}",
        store="memory://",
        web_enabled=False,
    )
    batching = BatchingApp(
        "compat-batching", datadir=str(tmp_path / "b"), fetch_wait_ms=20, **common
    )
    plain = faust.App("compat-plain", datadir=str(tmp_path / "p"), **common)
    return batching, plain


@pytest.fixture
def thread_loops(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close the event loops that faust's consumer and producer threads create when they
    are built: only a started thread closes its own, and these tests start none."""
    created: list[asyncio.AbstractEventLoop] = []
    new_event_loop = asyncio.new_event_loop

    def recorded() -> asyncio.AbstractEventLoop:
        created.append(new_event_loop())
        return created[-1]

    monkeypatch.setattr(asyncio, "new_event_loop", recorded)
    yield
    for loop in created:
        loop.close()


def with_apps(tmp_path: Path, broker: str, check: Callable[..., Awaitable[Any]]) -> Any:
    """``await check(batching_app, plain_app)`` in a running event loop, as faust expects
    (outside one, mode would create a loop of its own and keep it for the thread)."""

    async def main() -> Any:
        return await check(*_apps(tmp_path, broker))

    return asyncio.run(main())


@pytest.mark.parametrize("broker", ["kafka", "confluent"])
def test_batching_consumer_has_the_private_state_the_fetch_loop_uses(
    thread_loops, tmp_path, broker
):
    async def check(batching: faust.App, _plain: faust.App) -> None:
        consumer = batching.consumer
        assert isinstance(consumer, BatchDrain)
        missing = [n for n in CONSUMER_PRIVATE_ATTRIBUTES if not hasattr(consumer, n)]
        assert not missing, f"faust consumers no longer have {missing}: {RECHECK}"
        assert hasattr(consumer._stopped, "is_set")  # mode's Service stop event

    with_apps(tmp_path, broker, check)


def test_aiokafka_starts_its_fetcher_with_the_attribute_the_patch_writes():
    async def fetch_wait() -> int:
        consumer = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=UNREACHABLE_BROKER, fetch_max_wait_ms=1234
        )
        await consumer.stop()  # never started: only closes it
        return consumer._fetch_max_wait_ms

    assert asyncio.run(fetch_wait()) == 1234
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in inspect.getsource(
        aiokafka.AIOKafkaConsumer.start
    ), f"aiokafka {aiokafka.__version__} no longer reads _fetch_max_wait_ms at start"


def test_aiokafka_worker_consumer_gets_the_app_fetch_wait(thread_loops, tmp_path):
    async def fetch_waits(*apps: faust.App) -> list[int]:
        waits = []
        for app in apps:
            thread = app.consumer._thread
            assert isinstance(thread, faust_aiokafka.AIOKafkaConsumerThread)
            consumer = thread._create_worker_consumer(app.transport)
            await consumer.stop()
            waits.append(consumer._fetch_max_wait_ms)
        return waits

    # 1500: what faust-streaming 0.15.3 hard-codes, kept for an app without a wait.
    assert with_apps(tmp_path, "kafka", fetch_waits) == [20, 1500]


def test_confluent_consumer_config_gets_the_app_fetch_wait(thread_loops, tmp_path, monkeypatch):
    configs: list[dict] = []

    class RecordingConsumer:
        def __init__(self, **config: Any) -> None:
            configs.append(config)

    monkeypatch.setattr(faust_confluent.confluent_kafka, "Consumer", RecordingConsumer)

    async def build_consumers(*apps: faust.App) -> None:
        for app in apps:
            thread = app.consumer._thread
            assert isinstance(thread, faust_confluent.ConfluentConsumerThread)
            thread._create_consumer(loop=asyncio.get_running_loop())

    with_apps(tmp_path, "confluent", build_consumers)
    assert configs[0]["fetch.wait.max.ms"] == 20
    assert configs[0]["fetch.error.backoff.ms"] == 20
    assert "fetch.wait.max.ms" not in configs[1]
    assert configs[0]["group.id"] == "compat-batching"  # faust's own config is kept


def test_group_member_id_reads_what_the_aiokafka_driver_holds(thread_loops, tmp_path):
    """``group_member_id`` reads ``_thread._consumer._coordinator.member_id``; before a
    join it is None, and the names it reads are there."""

    async def check(batching: faust.App, _plain: faust.App) -> tuple[Any, bool]:
        thread = batching.consumer._thread
        return group_member_id(batching), hasattr(thread, "_consumer")

    assert with_apps(tmp_path, "kafka", check) == (None, True)
    assert "self._coordinator = GroupCoordinator(" in inspect.getsource(
        aiokafka.AIOKafkaConsumer.start
    ), f"aiokafka {aiokafka.__version__} no longer keeps its coordinator as _coordinator"
    assert "self.member_id" in inspect.getsource(
        importlib.import_module("aiokafka.consumer.group_coordinator").GroupCoordinator
    )


def test_leave_group_builds_the_request_aiokafka_defines():
    from aiokafka.protocol.group import LeaveGroupRequest

    assert str(without_annotations(LeaveGroupRequest.__init__)) == "(self, group, member_id)"


def test_batching_app_skips_the_table_manager_wait(thread_loops, tmp_path):
    async def check(batching: faust.App, plain: faust.App) -> tuple[type, type]:
        return type(batching.tables), type(plain.tables)

    assert with_apps(tmp_path, "kafka", check) == (PromptTableManager, TableManager)
