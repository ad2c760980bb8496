"""``slidr worker --processes N``: N worker processes of one consumer group on one host,
under one supervisor.

One Faust worker is one Python process, so it uses one core; a host with more cores
runs more of them, and the group spreads the partitions over them. The supervisor:

- starts each worker as a child process (``slidr worker`` forks them from the
  supervisor, ``run_forked``, so that a restarted child does not import faust, ONNX
  Runtime and the rest again: seconds on a busy host) with an environment of its own: its slot
  (0..N-1) gives it a stable instance id (``stream.membership``) and, when metrics are
  on, a port of its own (the base port plus the slot);
- restarts a child that exits while the supervisor is running: at once the first time
  (after a kill -9 the restart is then as fast as a restart can be), then after 1, 2,
  4 ... s, at most ``max_delay_s``; a child that ran ``stable_after_s`` starts counting
  again from zero. A slot that fails ``max_consecutive`` times in a row ends the
  supervisor with ``CrashLoopError``, and a child that exits with a user error (exit
  code 2: a bad setting, no model) is not restarted at all: another try would fail
  alike;
- on SIGTERM or SIGINT forwards the signal to every child, waits for them (``grace_s``,
  then SIGKILL) and returns 0 when every child stopped cleanly, 1 otherwise.

Children run in a process group of their own, so a terminal's Ctrl-C reaches them once,
through the supervisor; on Linux each child is also told to stop (SIGTERM) when the
supervisor dies, so a supervisor killed with -9 leaves no worker behind.

The supervisor does not print: it reports what happens through ``on_event``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from events.errors import EXIT_ERROR, SlidrError
from events.settings import Settings
from stream.membership import instance_id

_PR_SET_PDEATHSIG = 1  # prctl(2)


class CrashLoopError(SlidrError):
    """A worker process kept exiting; the message names the slot and its last exit code."""

    exit_code = 1


def default_processes() -> int:
    """One worker process per core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def slot_environment(settings: Settings, slot: int) -> dict[str, str]:
    """The variables that make child ``slot`` a member of its own: one process, its
    instance id (``<SLIDR_INSTANCE_ID or hostname>-<slot>``), its metrics port."""
    given = settings.instance_id
    env = {
        "SLIDR_WORKER_PROCESSES": "1",
        "SLIDR_INSTANCE_ID": f"{given}-{slot}" if given else instance_id(settings, slot),
    }
    if settings.metrics_port:
        env["SLIDR_METRICS_PORT"] = str(settings.metrics_port + slot)
    return env


@dataclass(frozen=True)
class RestartPolicy:
    max_consecutive: int = 5  # failures in a row of one slot before the supervisor gives up
    base_delay_s: float = 1.0  # the second restart's delay; doubles with each further one
    max_delay_s: float = 30.0
    stable_after_s: float = 60.0  # a child that ran this long had not been crash-looping

    def delay_s(self, failures: int) -> float:
        """Seconds to wait before restart number ``failures`` (1: the first)."""
        if failures <= 1:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * 2 ** (failures - 2))


class ChildProcess(Protocol):
    """What the supervisor needs of a child: ``subprocess.Popen`` has it."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


StartChild = Callable[[Mapping[str, str]], ChildProcess]


@dataclass
class _Child:
    slot: int
    env: dict[str, str]
    process: ChildProcess | None = None
    started_at: float = 0.0
    failures: int = 0  # exits in a row, reset by a stable run
    restart_at: float | None = None  # when a restart is due
    restarts: int = 0
    history: list[int] = field(default_factory=list)  # exit codes


def _die_with_parent(parent: int) -> None:
    """In a child: be sent SIGTERM when the parent dies (Linux only)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is not None:
        ctypes.CDLL(libc_name, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def run_command(command: Sequence[str]) -> StartChild:
    """Children that run ``command`` (a new process: imports and all)."""

    def start(env: Mapping[str, str]) -> ChildProcess:
        parent = os.getpid()
        return subprocess.Popen(
            list(command),
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            process_group=0,  # the supervisor forwards signals; a terminal's go to it
            preexec_fn=lambda: _die_with_parent(parent),
        )

    return start


def run_forked(target: Callable[[], int]) -> StartChild:
    """Children forked from the supervisor that call ``target`` (its return value is
    the exit code). Whatever the supervisor imported before is there already, so a
    restart skips the seconds a new Python process spends importing faust, ONNX Runtime
    and the rest. The supervisor must hold no thread or client that ``target`` uses."""

    def start(env: Mapping[str, str]) -> ChildProcess:
        return ForkedProcess(target, env)

    return start


class ForkedProcess:
    """A forked child running ``target`` with ``env`` added to its environment; the
    ``Popen`` methods the supervisor uses."""

    def __init__(self, target: Callable[[], int], env: Mapping[str, str]) -> None:
        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would print the parent's buffer again
        pid = os.fork()
        if pid == 0:
            os._exit(_child_main(parent, target, env))
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def _child_main(parent: int, target: Callable[[], int], env: Mapping[str, str]) -> int:
    """The forked child's life; its exit code. Never returns into the supervisor."""
    code = 1
    try:
        os.setpgid(0, 0)  # as run_command's children: signals come through the supervisor
        _die_with_parent(parent)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)  # not the supervisor's handlers
        os.environ.update(env)
        code = target()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    return code


class Supervisor:
    """Starts one child per environment in ``envs`` (one per slot) with ``start_child``
    (``run_command`` or ``run_forked``) and keeps them running."""

    def __init__(
        self,
        start_child: StartChild,
        envs: Sequence[Mapping[str, str]],
        policy: RestartPolicy | None = None,
        on_event: Callable[[str], None] = lambda _m: None,
        grace_s: float = 30.0,
        poll_s: float = 0.05,
    ) -> None:
        self.start_child = start_child
        self.children = [_Child(slot, dict(env)) for slot, env in enumerate(envs)]
        self.policy = policy or RestartPolicy()
        self.on_event = on_event
        self.grace_s = grace_s
        self.poll_s = poll_s
        self._stop_signal: int | None = None
        self._wake = threading.Event()

    def pids(self) -> list[int]:
        """Pids of the children running now."""
        return [c.process.pid for c in self.children if c.process and c.process.poll() is None]

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop every child with ``signum`` and return from ``run`` (signal-safe)."""
        if self._stop_signal is None:
            self._stop_signal = signum
        self._wake.set()

    def run(self) -> int:
        """Start the children and keep them running until a stop is requested; the exit
        code (0: every child stopped cleanly). Raises ``CrashLoopError``."""
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, lambda signum, _frame: self.request_stop(signum))
        try:
            for child in self.children:
                self._start(child)
            while self._stop_signal is None:
                self._wake.wait(self.poll_s)
                if self._stop_signal is None:
                    self._tend()
            return self._stop_all(self._stop_signal)
        except BaseException:
            self._stop_all(signal.SIGTERM)
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self, child: _Child) -> None:
        child.process = self.start_child(child.env)
        child.started_at = time.monotonic()
        child.restart_at = None
        self.on_event(
            f"worker {child.slot} started (pid {child.process.pid}, "
            f"instance {child.env.get('SLIDR_INSTANCE_ID', '?')})"
        )

    def _tend(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restarts += 1
                    self._start(child)
                continue
            assert child.process is not None
            code = child.process.poll()
            if code is None:
                continue
            child.history.append(code)
            if now - child.started_at >= self.policy.stable_after_s:
                child.failures = 0
            child.failures += 1
            how = describe_exit(code)
            if code == EXIT_ERROR:
                raise CrashLoopError(
                    f"worker {child.slot} (pid {child.process.pid}) {how}: a setting or "
                    "the model is wrong, and a restart would fail alike; see its log above",
                    exit_code=EXIT_ERROR,
                )
            if child.failures > self.policy.max_consecutive:
                raise CrashLoopError(
                    f"worker {child.slot} exited {child.failures} times in a row (last: "
                    f"{how}); giving up. Its log above says why"
                )
            delay = self.policy.delay_s(child.failures)
            child.restart_at = now + delay
            self.on_event(
                f"worker {child.slot} (pid {child.process.pid}) {how}; restarting in "
                f"{delay:.0f} s ({child.failures} of at most {self.policy.max_consecutive} "
                "in a row)"
            )

    def _stop_all(self, signum: int) -> int:
        running = [c for c in self.children if c.process and c.process.poll() is None]
        if running:
            self.on_event(
                f"stopping {len(running)} worker(s) ({signal.Signals(signum).name} forwarded)"
            )
        for child in running:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                os.kill(child.process.pid, signum)
        deadline = time.monotonic() + self.grace_s
        clean = True
        for child in running:
            assert child.process is not None
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.on_event(f"worker {child.slot} did not stop in {self.grace_s:.0f} s: killed")
                child.process.kill()
                child.process.wait()
            code = child.process.wait()  # reaped above: returns at once
            if code not in (0, -signum):
                clean = False
                self.on_event(f"worker {child.slot} {describe_exit(code)}")
        return 0 if clean else 1


def describe_exit(code: int) -> str:
    """``exited with code 3`` or ``was killed by SIGKILL``."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
