"""The embedded local stack: start, stop, status, stale state, and endpoint resolution."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from confluent_kafka.admin import AdminClient

from events.settings import Settings
from stream.local_stack import (
    REDIS_EVICTION_POLICY,
    REDIS_MAXMEMORY_BYTES,
    LocalStack,
    StackError,
    StackNotRunning,
    broker_binary,
    redis_binary,
    resolve_endpoints,
)

REPO = Path(__file__).resolve().parents[2]


def _binaries_available() -> bool:
    try:
        broker_binary()
        redis_binary()
    except StackError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state != "Z"


def _wait_dead(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _alive(pid), f"pid {pid} still alive"


def _dead_pid() -> int:
    """A pid that existed and has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.fixture
def local(tmp_path: Path):
    stack = LocalStack(tmp_path)
    yield stack
    stack.down()


# These tests start servers of their own, not the session's `stack`.
@pytest.mark.integration
@pytest.mark.skipif(not _binaries_available(), reason="Tansu or Valkey binary missing")
class TestLifecycle:
    def test_up_status_down(self, local: LocalStack) -> None:
        info = local.up()
        assert info.bootstrap.startswith("127.0.0.1:")
        assert info.redis_url.startswith("redis://127.0.0.1:")

        status = local.status()
        assert status.healthy and status.running
        assert (status.broker.pid, status.redis.pid) == (info.broker_pid, info.redis_pid)
        assert status.broker.address == info.bootstrap
        assert "healthy" in status.describe()

        # The servers answer as themselves.
        metadata = AdminClient({"bootstrap.servers": info.bootstrap}).list_topics(timeout=5)
        assert metadata.cluster_id == info.cluster_id
        assert redis.Redis.from_url(info.redis_url).ping()

        state = local.state_dir
        assert json.loads((state / "stack.json").read_text())["bootstrap"] == info.bootstrap
        assert int((state / "broker.pid").read_text()) == info.broker_pid
        assert int((state / "redis.pid").read_text()) == info.redis_pid

        local.down()
        for pid in (info.broker_pid, info.redis_pid):
            _wait_dead(pid, timeout=0.5)  # down() returns only once they are gone
        assert not (state / "broker.pid").exists()
        assert not (state / "redis.pid").exists()
        assert not (state / "stack.json").exists()
        assert (state / "broker.log").exists()  # logs are kept for post-mortems
        after = local.status()
        assert not after.running and not after.healthy
        local.down()  # stopping a stopped stack is fine

    def test_up_is_idempotent(self, local: LocalStack) -> None:
        first = local.up()
        second = local.up()
        assert second == first

    def test_up_restarts_only_the_dead_server(self, local: LocalStack) -> None:
        first = local.up()
        os.kill(first.redis_pid, signal.SIGKILL)
        _wait_dead(first.redis_pid)

        status = local.status()
        assert status.broker.healthy
        assert not status.redis.running and not status.healthy

        second = local.up()
        assert (second.broker_pid, second.cluster_id) == (first.broker_pid, first.cluster_id)
        assert second.redis_pid != first.redis_pid
        assert local.status().healthy

    def test_a_corrupt_stack_json_is_replaced_by_up(self, local: LocalStack) -> None:
        first = local.up()
        (local.state_dir / "stack.json").write_text("{not json")
        with pytest.raises(StackError, match="unreadable"):
            resolve_endpoints(Settings(home=local.home))
        second = local.up()  # stops the servers named by the pid files, starts afresh
        _wait_dead(first.broker_pid)
        assert second.broker_pid != first.broker_pid
        assert resolve_endpoints(Settings(home=local.home)) == (second.bootstrap, second.redis_url)

    def test_servers_outlive_the_process_that_started_them(self, tmp_path: Path) -> None:
        script = (
            "import sys; from pathlib import Path; from stream.local_stack import LocalStack; "
            "LocalStack(Path(sys.argv[1])).up()"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env)
        local = LocalStack(tmp_path)
        try:
            status = local.status()
            assert status.healthy
            # Own session: a Ctrl-C in the terminal that ran `slidr up` does not reach it.
            assert os.getsid(status.broker.pid) == status.broker.pid
            assert os.getsid(status.redis.pid) == status.redis.pid
        finally:
            local.down()
        _wait_dead(status.broker.pid)

    def test_stale_pid_files_are_cleaned(self, local: LocalStack) -> None:
        dead = _dead_pid()
        local.state_dir.mkdir(parents=True)
        (local.state_dir / "broker.pid").write_text(f"{dead}\n")
        # A live process that is not a server of ours must never be signalled.
        (local.state_dir / "redis.pid").write_text(f"{os.getpid()}\n")

        status = local.status()
        assert not status.broker.running and not status.redis.running

        info = local.up()
        assert dead not in (info.broker_pid, info.redis_pid)
        assert int((local.state_dir / "redis.pid").read_text()) == info.redis_pid
        assert local.status().healthy

    def test_down_never_signals_a_foreign_process(self, local: LocalStack) -> None:
        local.state_dir.mkdir(parents=True)
        (local.state_dir / "broker.pid").write_text(f"{os.getpid()}\n")
        local.down()  # would kill the test run if it signalled the recorded pid
        assert not (local.state_dir / "broker.pid").exists()

    def test_fixed_port_in_use_is_a_clear_error(self, tmp_path: Path) -> None:
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            with pytest.raises(StackError, match=f"127.0.0.1:{port} is already in use"):
                LocalStack(tmp_path, broker_port=port).up()
        assert not (tmp_path / "stack" / "broker.pid").exists()

    def test_fixed_ports_are_used(self, tmp_path: Path) -> None:
        from stream.local_stack import free_port

        broker_port, redis_port = free_port(), free_port()
        local = LocalStack(tmp_path, broker_port=broker_port, redis_port=redis_port)
        try:
            info = local.up()
            assert info.bootstrap == f"127.0.0.1:{broker_port}"
            assert info.redis_url == f"redis://127.0.0.1:{redis_port}/0"
        finally:
            local.down()

    def test_failed_start_shows_the_log_and_stops_the_rest(
        self, local: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        fake = tmp_path / "fake-redis-server"
        fake.write_text("#!/bin/sh\necho 'boom: cannot start'\nexit 3\n")
        fake.chmod(0o755)
        monkeypatch.setattr("stream.local_stack.redis_binary", lambda: str(fake))

        with pytest.raises(StackError, match=r"(?s)redis exited with code 3.*boom: cannot start"):
            local.up()
        # The broker that had started is stopped again: no half stack is left behind.
        assert not (local.state_dir / "broker.pid").exists()
        assert not (local.state_dir / "stack.json").exists()
        assert not local.status().broker.running


def test_the_local_valkey_is_bounded_and_evicts_the_least_recently_used(stack) -> None:
    """Every key slidr writes has a time to live; at the bound Valkey evicts rather than
    refusing writes (which would degrade every decision)."""
    config = redis.Redis.from_url(stack.redis_url).config_get("maxmemory*")
    assert int(config["maxmemory"]) == REDIS_MAXMEMORY_BYTES > 0
    assert config["maxmemory-policy"] == REDIS_EVICTION_POLICY == "allkeys-lru"


class TestResolveEndpoints:
    def test_settings_win_over_the_stack(self, stack) -> None:
        settings = Settings(
            home=stack.home,
            kafka_bootstrap="kafka.example:9092",
            redis_url="redis://redis.example:6379/0",
        )
        assert resolve_endpoints(settings) == ("kafka.example:9092", "redis://redis.example:6379/0")

    def test_the_running_stack_fills_the_gaps(self, stack) -> None:
        assert resolve_endpoints(Settings(home=stack.home)) == (stack.bootstrap, stack.redis_url)
        mixed = Settings(home=stack.home, kafka_bootstrap="kafka.example:9092")
        assert resolve_endpoints(mixed) == ("kafka.example:9092", stack.redis_url)

    def test_no_stack_and_no_settings_is_a_clear_error(self, tmp_path: Path) -> None:
        with pytest.raises(StackNotRunning, match=r"SLIDR_KAFKA_BOOTSTRAP.*slidr up"):
            resolve_endpoints(Settings(home=tmp_path))
        with pytest.raises(StackNotRunning, match=r"SLIDR_REDIS_URL.*slidr up"):
            resolve_endpoints(Settings(home=tmp_path, kafka_bootstrap="127.0.0.1:9092"))

    def test_a_stale_stack_is_a_clear_error(self, tmp_path: Path) -> None:
        dead = _dead_pid()
        state = tmp_path / "stack"
        state.mkdir()
        stale = {
            "bootstrap": "127.0.0.1:1",
            "redis_url": "redis://127.0.0.1:2/0",
            "broker_pid": dead,
            "redis_pid": dead,
            "cluster_id": "slidr-gone",
            "broker_bin": "/nonexistent/tansu",
            "redis_bin": "/nonexistent/valkey-server",
            "state_dir": str(state),
            "started_at": 0.0,
        }
        (state / "stack.json").write_text(json.dumps(stale))
        with pytest.raises(StackNotRunning, match=r"not running .*run `slidr up` again"):
            resolve_endpoints(Settings(home=tmp_path))
