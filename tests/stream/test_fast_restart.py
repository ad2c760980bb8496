"""Restarts without waiting out the dead member (``stream.membership``), and several
worker processes under one supervisor (``slidr worker --processes N``), on the embedded
stack.

How long a restart takes is a figure for ``slidr bench --restart``; the one bound here
is the behaviour that ``fenced`` membership exists for. After a kill -9 the group holds
the dead member until its session times out, and until then the broker cannot hand its
partitions to anyone: a plain restart decides nothing for at least a session timeout
after the kill. With the session at 40 s (Tansu holds each join for half of it, 20 s)
the restarted worker of a ``fenced`` group decides well inside that window, and a
worker that did not remove its predecessor could not.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

from stream.local_stack import free_port
from stream.membership import read_member
from tests.stream.test_worker import clicks_of, duplicates_agree
from tests.stream.worker_harness import (
    DecisionReader,
    PacedProducer,
    click_record,
    scrape_metric,
    unique,
    wait_until,
)

SESSION_S = 40  # see the module docstring
JOIN_S = 150  # two workers joining one after the other: two joins held 20 s each, and more
DECIDE_S = 120


def decided_by(port: int) -> float:
    """Decisions published by the worker serving metrics on ``port``; 0 while it is not
    up yet (a new process counts from 0)."""
    try:
        return scrape_metric(port, "slidr_decisions_out_total", timeout=1.0)
    except OSError:
        return 0.0


def test_a_killed_worker_restarted_with_its_instance_id_removes_its_predecessor(
    worker_settings, workers, dataset
) -> None:
    """Two workers share a group; one is killed with -9 and started again with the same
    instance id. On start it removes the member its predecessor left (the log says so,
    naming the member id recorded at its assignment), decides again before the dead
    member's session could have run out, and together the two decide every click."""
    group = unique("g")
    ports = {name: free_port() for name in ("first", "second")}
    session = {"SLIDR_SESSION_TIMEOUT_MS": str(SESSION_S * 1000)}
    first = workers.new("first", group, SLIDR_METRICS_PORT=str(ports["first"]), **session)
    second = workers.new("second", group, SLIDR_METRICS_PORT=str(ports["second"]), **session)
    clicks = clicks_of(dataset, 0, 15_000)
    producer = PacedProducer(worker_settings, [click_record(c) for c in clicks], rate=80)
    reader = DecisionReader(worker_settings)
    record = first.home / "members" / group / "first"

    def both_alive() -> bool:
        return first.running and second.running

    try:
        first.start()
        second.start()
        producer.start()
        assert wait_until(
            lambda: (
                (decided_by(ports["first"]) > 0 and decided_by(ports["second"]) > 0)
                or not both_alive()
            ),
            JOIN_S,
        ), f"the two workers did not both decide:\n{workers.describe()}"
        assert both_alive(), workers.describe()
        predecessor = read_member(record)
        assert predecessor, f"no member id recorded at {record}"

        first.kill()
        killed_at = time.monotonic()
        first.start()
        decided_again = wait_until(
            lambda: decided_by(ports["first"]) > 0 or not first.running, SESSION_S, step=0.2
        )
        restart_s = time.monotonic() - killed_at
        producer.stop_event.set()
        producer.join(30)
        sent = [c["click_id"] for c in clicks[: producer.sent]]
        missing = reader.wait_for(sent, DECIDE_S, both_alive)
    finally:
        producer.stop_event.set()
        reader.close()

    assert both_alive(), workers.describe()
    assert decided_again, (
        f"the restarted worker decided nothing within the {SESSION_S} s session:\n"
        + workers.describe()
    )
    print(f"first decision of the restarted worker {restart_s:.1f} s after the kill")
    restarted_log = first.log_text().rsplit("=== test: start #2", 1)[1]
    assert f"removed this instance's previous member {predecessor}: NoError" in restarted_log
    assert read_member(record) not in (None, predecessor)  # its own member id now
    assert not missing, f"{len(missing)} of {len(sent)} clicks undecided:\n{workers.describe()}"
    # Not asserted here: that a click decided twice got the same verdict. Its partition
    # moves twice (to the other worker when the dead member is removed, back when the
    # restarted one joins), and equal verdicts across a move are the changelog's to
    # keep (tests/stream/test_state_handover.py), not membership's.
    print(f"{len(duplicates_agree(reader))} clicks decided twice with different verdicts")


def consecutive_free_ports(count: int) -> int:
    """A port P such that P .. P+count-1 are free on 127.0.0.1 now."""
    for _ in range(50):
        base = free_port()
        if base + count > 65535:
            continue
        try:
            held = []
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return base
    raise AssertionError("no run of free ports")


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out.extend(int(p) for p in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_processes_2_restarts_a_killed_child_and_stops_every_child_on_sigterm(
    worker_settings, workers, dataset
) -> None:
    """``slidr worker --processes 2`` (here through ``SLIDR_WORKER_PROCESSES``): two
    children, each with its own metrics port, both decide; a child killed with -9 is
    started again by the supervisor and decides again; every click is decided; SIGTERM
    to the supervisor stops both children and it exits 0."""
    base = consecutive_free_ports(2)
    supervised = workers.new(
        "supervised",
        unique("g"),
        SLIDR_WORKER_PROCESSES="2",
        SLIDR_METRICS_PORT=str(base),
    )
    clicks = clicks_of(dataset, 0, 12_000)
    producer = PacedProducer(worker_settings, [click_record(c) for c in clicks], rate=80)
    reader = DecisionReader(worker_settings)
    try:
        supervised.start()
        producer.start()
        assert wait_until(
            lambda: (decided_by(base) > 0 and decided_by(base + 1) > 0) or not supervised.running,
            JOIN_S,
        ), f"the two children did not both decide:\n{supervised.log_tail(80)}"
        children = children_of(supervised.pid)
        assert len(children) == 2, children

        victim = children[1]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(
            lambda: (
                len(children_of(supervised.pid)) == 2 and victim not in children_of(supervised.pid)
            ),
            30,
        ), supervised.log_tail(80)
        killed = re.search(
            rf"worker (\d) \(pid {victim}\) was killed by SIGKILL", supervised.log_text()
        )
        assert killed, supervised.log_tail(80)
        # A new process counts from 0: decisions on its slot's port are the new one's.
        port_of_victim = base + int(killed.group(1))
        assert wait_until(lambda: decided_by(port_of_victim) > 0, JOIN_S), supervised.log_tail(80)

        producer.stop_event.set()
        producer.join(30)
        sent = [c["click_id"] for c in clicks[: producer.sent]]
        missing = reader.wait_for(sent, DECIDE_S, lambda: supervised.running)
        last_children = children_of(supervised.pid)
        code = supervised.stop(timeout=60)
    finally:
        producer.stop_event.set()
        reader.close()

    assert not missing, f"{len(missing)} of {len(sent)} clicks undecided"
    assert "was killed by SIGKILL; restarting in 0 s" in supervised.log_text()
    assert code == 0, supervised.log_tail(80)
    assert last_children and not any(alive(pid) for pid in last_children)
