"""``slidr bench --restart`` and ``--scaling``: a worker's recovery after kill -9, and
clicks/s of one worker process against N of them in one group.

Nothing here asserts a time (tests never time things): the figures are reported with the
settings and the CPU shares that produced them.

- restart: a worker decides a steady stream of clicks; it is killed (SIGKILL) and
  started again at once with the same instance id, several times. Each run's figure is
  the time from the kill to the first decision the restarted process made (its
  ``decided_at``: the killed process can decide nothing after its kill), for each
  ``SLIDR_GROUP_MEMBERSHIP`` asked for. Afterwards every click produced must be decided.
  Then the same under the supervisor: ``slidr worker --processes 2``, one child killed
  per run and forked again by the supervisor (no imports to redo), timed to that child's
  first decision.
- scaling: the same backlog decided by ``slidr worker --processes 1`` and by
  ``--processes N`` (the supervisor, ``stream.supervisor``), clicks/s from the first
  decision to the last, with the share of a core that the broker, Redis and the workers
  used meanwhile (from ``/proc/<pid>/stat``) and the machine's load average: on a small
  machine the broker, Redis and other jobs compete with the workers for the same cores,
  and the ratio says as much about that as about the workers.
"""

from __future__ import annotations

import functools
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
from confluent_kafka import Producer

from data.dataset import load_dataset
from events.settings import Settings
from stream.bench import _child_env, _unique, stop_worker
from stream.kafka import CLICKS, DECISIONS, producer_config
from stream.producer import produce_dataset
from stream.topics import BEGINNING, TopicTail

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


class DecisionClock(threading.Thread):
    """Reads ``decisions`` from offset 0: the distinct clicks decided, the latest
    ``decided_at`` seen and when each first decision arrived."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(daemon=True)
        self.tail = TopicTail(
            settings, [DECISIONS], start=BEGINNING, label="clock", wait_s=0.05, as_arrived=True
        )
        self.decided: set[str] = set()
        self.first_arrival: float | None = None
        self.last_arrival: float | None = None
        self.latest_decided_at = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        with self.tail:
            for messages in self.tail.batches(stop=self.stop):
                if not messages:
                    continue
                now = time.time()
                for msg in messages:
                    decision = orjson.loads(msg.value() or b"{}")
                    if "click_id" not in decision:
                        continue
                    if decision["click_id"] not in self.decided:
                        self.decided.add(decision["click_id"])
                        self.last_arrival = now
                    self.latest_decided_at = max(self.latest_decided_at, decision["decided_at"])
                if self.first_arrival is None:
                    self.first_arrival = now

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


class ClickStream(threading.Thread):
    """Produces clicks of a data set at ``rate`` per second, each with a click id of its
    own, until stopped."""

    def __init__(self, settings: Settings, data: Path, rate: float, tag: str) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.cols = load_dataset(data).clicks
        self.rate = rate
        self.tag = tag
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        producer = Producer(producer_config(self.settings))
        topic = self.settings.topic(CLICKS)
        n = len(self.cols)
        started = time.perf_counter()
        while not self.stop.is_set():
            delay = started + self.sent / self.rate - time.perf_counter()
            if delay > 0:
                self.stop.wait(delay)
                continue
            row = self.cols.row(self.sent % n)
            row["click_id"] = f"{self.tag}-{self.sent}"
            producer.produce(topic, key=row["user_id"].encode(), value=orjson.dumps(row))
            producer.poll(0)
            self.sent += 1
        producer.flush(30)


@dataclass
class WorkerCommand:
    """``slidr worker`` with the bench's environment, started and restarted alike."""

    settings: Settings
    registry: Path
    home: Path
    log_path: Path
    args: tuple[str, ...] = ("--processes", "1")
    extra_env: dict[str, str] | None = None

    def start(self) -> subprocess.Popen:
        env = {**_child_env(self.settings, self.registry, self.home), **(self.extra_env or {})}
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "slidr", "worker", *self.args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {
        "median_s": round(statistics.median(values), 2),
        "min_s": round(min(values), 2),
        "max_s": round(max(values), 2),
    }


def _time_restart(
    clock: DecisionClock,
    restarted: Callable[[], bool],
    killed_at: float,
    since: Callable[[float], float],
    label: str,
    seconds: list[float],
    progress: Callable[[str], None],
) -> bool:
    """Wait up to 90 s for ``restarted``; record ``since(killed_at)`` then, in ``seconds``.
    False: no decision came."""
    if not clock.wait(restarted, 90):
        progress(f"{label}: no decision within 90 s")
        return False
    seconds.append(since(killed_at))
    progress(f"{label}: {seconds[-1]:.2f} s")
    return True


def _drain(clicks: ClickStream, clock: DecisionClock) -> None:
    """Stop producing; lossless: wait until every click produced is decided."""
    clicks.stop.set()
    clicks.join(60)
    clock.wait(lambda: len(clock.decided) >= clicks.sent, 120)


def bench_restart(
    settings: Settings,
    registry: Path,
    data: Path,
    workdir: Path,
    membership: str,
    runs: int = 5,
    rate: float = 200.0,
    settle_s: float = 4.0,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Kill -9 and restart one worker ``runs`` times under ``membership``; seconds from
    each kill to the restarted worker's first decision."""
    s = _unique(settings, f"restart-{membership}")
    home = workdir / f"home-restart-{membership}"
    worker = WorkerCommand(
        s,
        registry,
        home,
        workdir / f"worker-restart-{membership}.log",
        extra_env={
            "SLIDR_GROUP_MEMBERSHIP": membership,
            "SLIDR_INSTANCE_ID": "bench-restart-0",
        },
    )
    clock = DecisionClock(s)
    clock.start()
    clicks = ClickStream(s, data, rate, f"restart-{membership}")
    clicks.start()
    proc = worker.start()
    seconds: list[float] = []
    failed = 0
    try:
        if not clock.wait(lambda: clock.first_arrival is not None, 120):
            raise RuntimeError(f"the worker decided nothing in 120 s; see {worker.log_path}")
        for run in range(runs):
            time.sleep(settle_s)
            killed_at = time.time()
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc = worker.start()

            def decided_since(at: float = killed_at) -> bool:
                return clock.latest_decided_at > at

            label = f"restart ({membership}) {run + 1}/{runs}"
            if not _time_restart(
                clock,
                decided_since,
                killed_at,
                lambda at: clock.latest_decided_at - at,
                label,
                seconds,
                progress,
            ):
                failed += 1
        _drain(clicks, clock)
    finally:
        clicks.stop.set()
        stop_worker(proc)
        clock.stop.set()
    return {
        "membership": membership,
        "session_timeout_ms": s.session_timeout_ms,
        "rate": rate,
        "runs_s": [round(x, 2) for x in seconds],
        "runs_without_decision": failed,
        **summary(seconds),
        "clicks_produced": clicks.sent,
        "clicks_undecided": max(0, clicks.sent - len(clock.decided)),
    }


def _decisions_served(port: int) -> float:
    """``slidr_decisions_out_total`` of the worker serving metrics on ``port``; 0 while
    nothing answers there (a new process counts from 0)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("slidr_decisions_out_total")
    )


def bench_supervised_restart(
    settings: Settings,
    registry: Path,
    data: Path,
    workdir: Path,
    runs: int = 5,
    rate: float = 200.0,
    settle_s: float = 4.0,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict:
    """``slidr worker --processes 2``: kill -9 one child ``runs`` times (slots in turn)
    and let the supervisor fork it again; seconds from each kill to the restarted child's
    first decision (its own metrics endpoint, polled every 50 ms)."""
    import re

    from stream.local_stack import free_port

    s = _unique(settings, "restart-supervised")
    base = free_port()
    worker = WorkerCommand(
        s,
        registry,
        workdir / "home-restart-supervised",
        workdir / "worker-restart-supervised.log",
        args=("--processes", "2"),
        extra_env={"SLIDR_METRICS_PORT": str(base), "SLIDR_INSTANCE_ID": "bench"},
    )
    clock = DecisionClock(s)
    clock.start()
    clicks = ClickStream(s, data, rate, "supervised")
    clicks.start()
    proc = worker.start()
    seconds: list[float] = []
    failed = 0
    try:
        if not clock.wait(
            lambda: _decisions_served(base) > 0 and _decisions_served(base + 1) > 0, 180
        ):
            raise RuntimeError(f"the two children did not both decide; see {worker.log_path}")
        for run in range(runs):
            time.sleep(settle_s)
            children = process_tree(proc.pid)[1:]
            victim = children[run % len(children)]
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            pattern = re.compile(rf"worker (\d+) \(pid {victim}\) was killed")
            found: list[re.Match] = []

            def restarted(pattern=pattern, found=found) -> bool:
                if not found:
                    match = pattern.search(worker.log_path.read_text(errors="replace"))
                    if match is None:
                        return False
                    found.append(match)
                return _decisions_served(base + int(found[0].group(1))) > 0

            label = f"supervised restart {run + 1}/{runs}"
            if not _time_restart(
                clock,
                restarted,
                killed_at,
                lambda at: time.monotonic() - at,
                label,
                seconds,
                progress,
            ):
                failed += 1
        _drain(clicks, clock)
    finally:
        clicks.stop.set()
        stop_worker(proc)
        clock.stop.set()
    return {
        "membership": s.group_membership,
        "session_timeout_ms": s.session_timeout_ms,
        "rate": rate,
        "runs_s": [round(x, 2) for x in seconds],
        "runs_without_decision": failed,
        **summary(seconds),
        "clicks_produced": clicks.sent,
        "clicks_undecided": max(0, clicks.sent - len(clock.decided)),
    }


# -- scaling --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux: ``/proc/<pid>/task/*/children``)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return out


class CpuMeter:
    """CPU seconds of named process groups between ``start`` and ``stop``, as shares of
    one core over the wall time between them."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.began: dict[str, dict[int, float]] = {}
        self.began_at = 0.0

    def _sample(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pids in self.groups.items():
            out[name] = {}
            for pid in pids():
                used = cpu_seconds(pid)
                if used is not None:
                    out[name][pid] = used
        return out

    def start(self) -> None:
        self.began, self.began_at = self._sample(), time.monotonic()

    def stop(self) -> dict[str, float]:
        ended, wall = self._sample(), time.monotonic() - self.began_at
        shares = {}
        for name, now in ended.items():
            before = self.began.get(name, {})
            used = sum(t - before.get(pid, 0.0) for pid, t in now.items())
            shares[name] = round(used / wall, 3) if wall > 0 else 0.0
        return shares


def decide_backlog_with(
    settings: Settings,
    registry: Path,
    data: Path,
    clicks: int,
    workdir: Path,
    processes: int,
    server_pids: dict[str, int],
) -> dict:
    """A backlog of ``clicks`` decided by ``slidr worker --processes N``: clicks/s from the
    first decision to the last, and the CPU shares over that span."""
    s = _unique(settings, f"scale{processes}")
    produced = produce_dataset(s, data, limit=clicks, progress=False).clicks
    clock = DecisionClock(s)
    clock.start()
    worker = WorkerCommand(
        s,
        registry,
        workdir / f"home-scale{processes}",
        workdir / f"worker-scale{processes}.log",
        args=("--processes", str(processes)),
    )
    proc = worker.start()
    groups: dict[str, Callable[[], list[int]]] = {
        name: functools.partial(list, (pid,)) for name, pid in server_pids.items()
    }
    groups["workers"] = functools.partial(process_tree, proc.pid)
    meter = CpuMeter(groups)
    try:
        if not clock.wait(lambda: clock.first_arrival is not None or proc.poll() is not None, 180):
            raise RuntimeError(f"no decision within 180 s; see {worker.log_path}")
        meter.start()
        done = clock.wait(
            lambda: len(clock.decided) >= produced or proc.poll() is not None,
            max(120.0, produced / 300),
        )
        shares = meter.stop()
    finally:
        stop_worker(proc)
        clock.stop.set()
    first, last = clock.first_arrival, clock.last_arrival
    span = (last - first) if first is not None and last is not None else 0.0
    return {
        "processes": processes,
        "clicks": len(clock.decided),
        "complete": done and len(clock.decided) >= produced,
        "clicks_per_s": round(len(clock.decided) / span) if span > 0 else None,
        "cpu_share_of_one_core": shares,
        # Runnable processes of the whole machine: other jobs' share of the same cores.
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def bench_scaling(
    settings: Settings,
    registry: Path,
    data: Path,
    clicks: int,
    workdir: Path,
    processes: int,
    server_pids: dict[str, int],
    progress: Callable[[str], None] = lambda _m: None,
) -> dict:
    """One worker process against ``processes`` of them on the same backlog size."""
    out: dict = {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))}
    for n in sorted({1, processes}):
        progress(f"scaling: {clicks:,} clicks through {n} worker process(es)")
        out[f"processes_{n}"] = decide_backlog_with(
            settings, registry, data, clicks, workdir, n, server_pids
        )
    one, many = out["processes_1"]["clicks_per_s"], out[f"processes_{processes}"]["clicks_per_s"]
    out["ratio"] = round(many / one, 3) if one and many else None
    return out


# -- running them -----------------------------------------------------------------------------


@dataclass
class FleetBenchOptions:
    restart_runs: int = 0  # kills per membership mode; 0: no restart benchmark
    memberships: tuple[str, ...] = ("dynamic", "fenced")  # "dynamic" is the before
    restart_rate: float = 200.0  # clicks/s produced while the worker is killed and restarted
    scaling_processes: int = 0  # N of "1 against N"; 0: no scaling benchmark
    scaling_clicks: int = 50_000


def run_fleet_bench(
    settings: Settings, options: FleetBenchOptions, progress: Callable[[str], None] = print
) -> dict:
    """The restart and scaling benchmarks on a private embedded stack (unless Kafka and
    Redis are given), with a model trained on a small simulation."""
    import tempfile

    from data.simulator import simulate
    from models.pipeline import TrainOptions, run_training
    from models.registry import ModelRegistry
    from stream.bench import _TUNING, machine
    from stream.local_stack import LocalStack

    report: dict = {
        "machine": machine(),
        "settings": {name: getattr(settings, name) for name in _TUNING},
    }
    with tempfile.TemporaryDirectory(prefix="slidr-bench-fleet-") as tmp:
        work = Path(tmp)
        progress("simulating and training a model")
        per_day = max(8000, options.scaling_clicks // 3)  # smaller days trip data guardrails
        simulate(work / "data", days=3, seed=11, clicks_per_day=per_day)
        registry = work / "registry"
        # One architecture, few epochs: what is measured here is the worker around the
        # model (ONNX inference is a few per cent of a click's cost, FINDINGS.md).
        run_training(
            work / "data",
            ModelRegistry(registry),
            TrainOptions(
                min_coverage=0.0, max_epochs=2, architectures=("mlp_embeddings",), peers=False
            ),
            progress=lambda m: None,
        )
        stack = None
        server_pids: dict[str, int] = {}
        if not (settings.kafka_bootstrap and settings.redis_url):
            stack = LocalStack(work / "home")
            info = stack.up()
            settings = settings.replace(
                kafka_bootstrap=info.bootstrap, redis_url=info.redis_url, home=work / "home"
            )
            server_pids = {"broker": info.broker_pid, "redis": info.redis_pid}
        try:
            if options.restart_runs:
                report["restart"] = {
                    membership: bench_restart(
                        settings,
                        registry,
                        work / "data",
                        work,
                        membership,
                        runs=options.restart_runs,
                        rate=options.restart_rate,
                        progress=progress,
                    )
                    for membership in options.memberships
                }
                report["restart_supervised"] = bench_supervised_restart(
                    settings,
                    registry,
                    work / "data",
                    work,
                    runs=options.restart_runs,
                    rate=options.restart_rate,
                    progress=progress,
                )
            if options.scaling_processes:
                report["scaling"] = bench_scaling(
                    settings,
                    registry,
                    work / "data",
                    options.scaling_clicks,
                    work,
                    options.scaling_processes,
                    server_pids,
                    progress,
                )
        finally:
            if stack is not None:
                stack.down()
    return report
