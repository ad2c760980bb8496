"""The worker supervisor (``stream.supervisor``) with stand-in children: no broker.

Each child is a short Python program; the tests drive the supervisor from a thread and
stop it with ``request_stop``, as its signal handlers would.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from events.settings import Settings
from stream.supervisor import (
    CrashLoopError,
    RestartPolicy,
    Supervisor,
    describe_exit,
    run_command,
    run_forked,
    slot_environment,
)

FAST = RestartPolicy(max_consecutive=3, base_delay_s=0.01, max_delay_s=0.05)


def child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


class Running:
    """A supervisor running in a thread; its result or error once it returns."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.result: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.supervisor.run()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 30.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the supervisor did not return"


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_child_is_restarted_and_a_stop_ends_every_child(tmp_path: Path) -> None:
    started = tmp_path / "started"
    code = (
        f"import os, time; open({str(started)!r}, 'a').write(os.environ['SLOT'] + ' '); "
        "time.sleep(600)"
    )
    events: list[str] = []
    supervisor = Supervisor(
        run_command(child(code)),
        [{"SLOT": "0"}, {"SLOT": "1"}],
        FAST,
        on_event=events.append,
        grace_s=5,
    )
    running = Running(supervisor)
    assert wait_for(lambda: len(supervisor.pids()) == 2), events
    assert wait_for(lambda: started.exists() and sorted(started.read_text().split()) == ["0", "1"])
    victim = supervisor.children[1].process.pid
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(supervisor.pids()) == 2 and victim not in supervisor.pids()), events
    assert supervisor.children[1].restarts == 1 and supervisor.children[0].restarts == 0
    assert any("worker 1" in e and "SIGKILL" in e for e in events), events
    # The restarted child has the environment of its slot.
    assert wait_for(lambda: sorted(started.read_text().split()) == ["0", "1", "1"])
    pids = supervisor.pids()
    supervisor.request_stop(signal.SIGTERM)
    running.join()
    assert running.error is None and running.result == 0  # children ended by the signal
    assert not any(alive(pid) for pid in pids)


def test_a_child_that_keeps_crashing_ends_the_supervisor_with_a_clear_error() -> None:
    events: list[str] = []
    supervisor = Supervisor(
        run_command(child("raise SystemExit(1)")), [{}], FAST, on_event=events.append
    )
    running = Running(supervisor)
    running.join()
    assert isinstance(running.error, CrashLoopError)
    assert "worker 0 exited 4 times in a row" in str(running.error)
    assert "exited with code 1" in str(running.error)
    assert supervisor.children[0].restarts == 3


def test_a_user_error_is_not_restarted() -> None:
    """Exit code 2 is a bad setting or a missing model: another try would fail alike."""
    supervisor = Supervisor(run_command(child("raise SystemExit(2)")), [{}, {}], FAST)
    running = Running(supervisor)
    running.join()
    assert isinstance(running.error, CrashLoopError)
    assert "exited with code 2" in str(running.error)
    assert running.error.exit_code == 2  # the supervisor exits as its child did
    assert all(c.restarts == 0 for c in supervisor.children)
    assert supervisor.pids() == []  # the other child was stopped too


def test_a_child_that_fails_to_stop_cleanly_gives_exit_code_1() -> None:
    code = (
        "import signal, sys, time; "
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3)); time.sleep(600)"
    )
    supervisor = Supervisor(run_command(child(code)), [{}], FAST, grace_s=5)
    running = Running(supervisor)
    assert wait_for(lambda: len(supervisor.pids()) == 1)
    time.sleep(0.3)  # the child's handler is installed once Python has started
    supervisor.request_stop(signal.SIGTERM)
    running.join()
    assert running.result == 1


def _forked_child() -> int:
    """A forked child: report its slot and pid, then wait to be stopped."""
    with open(os.environ["REPORT"], "a") as report:
        report.write(f"{os.environ['SLOT']}:{os.getpid()} ")
    time.sleep(600)
    return 0


def _forked_failure() -> int:
    return 4


def test_forked_children_run_the_target_with_their_environment(tmp_path: Path) -> None:
    report = tmp_path / "report"
    envs = [{"SLOT": str(slot), "REPORT": str(report)} for slot in range(2)]
    supervisor = Supervisor(run_forked(_forked_child), envs, FAST, grace_s=5)
    running = Running(supervisor)

    def reports() -> list[str]:
        return report.read_text().split() if report.exists() else []

    assert wait_for(lambda: len(reports()) == 2)
    assert sorted(r.split(":")[0] for r in reports()) == ["0", "1"]
    assert {int(r.split(":")[1]) for r in reports()} == set(supervisor.pids())
    victim = supervisor.children[0].process.pid
    os.kill(victim, signal.SIGKILL)
    assert wait_for(lambda: len(reports()) == 3)  # slot 0 forked again
    assert reports()[-1].startswith("0:")
    pids = supervisor.pids()
    supervisor.request_stop(signal.SIGTERM)
    running.join()
    assert running.result == 0
    assert not any(alive(pid) for pid in pids)


def test_a_forked_child_exit_code_is_its_target_return_value() -> None:
    supervisor = Supervisor(run_forked(_forked_failure), [{}], FAST)
    running = Running(supervisor)
    running.join()
    assert isinstance(running.error, CrashLoopError)
    assert "last: exited with code 4" in str(running.error)


def test_restarts_back_off_after_the_first() -> None:
    policy = RestartPolicy(base_delay_s=1.0, max_delay_s=30.0)
    assert [policy.delay_s(n) for n in (1, 2, 3, 4, 5, 10)] == [0, 1, 2, 4, 8, 30]


def test_each_slot_gets_its_own_instance_id_and_metrics_port() -> None:
    settings = Settings(instance_id="", metrics_port=9100)
    envs = [slot_environment(settings, slot) for slot in range(3)]
    assert [e["SLIDR_METRICS_PORT"] for e in envs] == ["9100", "9101", "9102"]
    assert len({e["SLIDR_INSTANCE_ID"] for e in envs}) == 3
    assert all(e["SLIDR_INSTANCE_ID"].endswith(f"-{i}") for i, e in enumerate(envs))
    assert all(e["SLIDR_WORKER_PROCESSES"] == "1" for e in envs)
    named = Settings(instance_id="pod-a", metrics_port=0)
    assert slot_environment(named, 1) == {
        "SLIDR_WORKER_PROCESSES": "1",
        "SLIDR_INSTANCE_ID": "pod-a-1",
    }


@pytest.mark.parametrize(
    ("code", "text"),
    [(0, "exited with code 0"), (3, "exited with code 3"), (-9, "was killed by SIGKILL")],
)
def test_exits_are_described(code: int, text: str) -> None:
    assert describe_exit(code) == text
