"""Helpers for the worker integration tests: run ``slidr worker`` as a subprocess, produce
clicks, read topics back with bounded loops, start a private Redis.

Every process started here is stopped by its pid (SIGTERM, then SIGKILL); every loop that
waits on the broker or a process has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from events.declarations import DECISION
from events.settings import Settings
from stream.kafka import CLICKS, CLICKS_DLQ, DECISIONS, consumer_config, producer_config

REPO = Path(__file__).resolve().parents[2]

# The product contract's decision fields (SPEC §1, Decision): every decision has them.
DECISION_FIELDS = DECISION.spec_names


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# -- workers ------------------------------------------------------------------------------


@dataclass
class WorkerProcess:
    """One ``python -m slidr worker`` subprocess, its environment and its log file."""

    name: str
    settings: Settings
    group_id: str
    home: Path
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    starts: int = 0

    def env(self) -> dict[str, str]:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDR_")}
        env.update(
            {
                "SLIDR_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
                "SLIDR_REDIS_URL": s.redis_url,
                "SLIDR_REGISTRY": str(s.registry),
                "SLIDR_HOME": str(self.home),
                "SLIDR_TOPIC_PREFIX": s.topic_prefix,
                "SLIDR_REDIS_KEY_PREFIX": s.redis_key_prefix,
                "SLIDR_PARTITIONS": str(s.partitions),
                # One process per WorkerProcess (the tests kill and stop it by its pid),
                # and an instance id of its own: two workers may share a home.
                "SLIDR_WORKER_PROCESSES": "1",
                "SLIDR_INSTANCE_ID": self.name,
                "PYTHONUNBUFFERED": "1",
            }
        )
        pythonpath = env.get("PYTHONPATH")
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{pythonpath}" if pythonpath else str(REPO)
        env.update(self.extra_env)
        return env

    def start(self) -> WorkerProcess:
        assert not self.running, f"{self.name} is already running"
        self.home.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(
                f"\n=== test: start #{self.starts} of {self.name} at {time.ctime()}\n".encode()
            )
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "slidr", "worker", "--group-id", self.group_id],
                cwd=REPO,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or committed."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        return self.process.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def assignment(self) -> tuple[int, frozenset[int]] | None:
        """(generation, partitions of ``clicks``) of the worker's current assignment, from
        its log; None before the first one or while a rebalance is in progress."""
        return current_assignment(self.log_text(), self.settings.topic(CLICKS))

    def metric(self, name: str) -> float:
        """Sum over labels of a Prometheus metric (needs ``SLIDR_METRICS_PORT``)."""
        return scrape_metric(int(self.extra_env["SLIDR_METRICS_PORT"]), name)


_JOINED = re.compile(r"Joined group '[^']*' \(generation (-?\d+)\)")


def current_assignment(log: str, topic: str) -> tuple[int, frozenset[int]] | None:
    """Parse faust's "Joined group"/"Setting newly assigned"/"Revoking" log lines."""
    generation: int | None = None
    state: tuple[int, frozenset[int]] | None = None
    table = ""
    for line in log.splitlines():
        joined = _JOINED.search(line)
        if joined:
            generation = int(joined.group(1))
        elif "Revoking previously assigned partitions" in line:
            table, state = "revoke", None
        elif "Setting newly assigned partitions" in line and generation is not None:
            table, state = "assign", (generation, frozenset())
        elif table == "assign" and line.startswith("|") and state is not None:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 2 and cells[0] == topic:
                state = (state[0], parse_partition_set(cells[1]))
    return state


def parse_partition_set(text: str) -> frozenset[int]:
    """``{0-3}``, ``{0, 2}``, ``{0-1, 3}`` -> partitions."""
    out: set[int] = set()
    for part in text.strip().strip("{}").split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return frozenset(out)


def split_between(first: WorkerProcess, second: WorkerProcess, partitions: frozenset[int]) -> bool:
    """Both workers hold partitions in the same generation, together all of them, none
    twice: the group settled with both members."""
    a, b = first.assignment(), second.assignment()
    return (
        a is not None
        and b is not None
        and a[0] == b[0]
        and bool(a[1])
        and bool(b[1])
        and not (a[1] & b[1])
        and a[1] | b[1] == partitions
    )


def scrape_metric(port: int, name: str, timeout: float = 5.0) -> float:
    """Sum of every sample of ``name`` at ``http://127.0.0.1:port/metrics``."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class WorkerPool:
    """Creates workers for one test and stops them all at teardown."""

    def __init__(self, settings: Settings, tmp: Path) -> None:
        self.settings = settings
        self.tmp = tmp
        self.workers: list[WorkerProcess] = []

    def new(
        self,
        name: str,
        group_id: str,
        home: Path | None = None,
        settings: Settings | None = None,
        **extra_env: str,
    ) -> WorkerProcess:
        worker = WorkerProcess(
            name=name,
            settings=settings or self.settings,
            group_id=group_id,
            home=home or self.tmp / f"home-{name}",
            log_path=self.tmp / f"{name}.log",
            extra_env=dict(extra_env),
        )
        self.workers.append(worker)
        return worker

    def stop_all(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):  # teardown must reach every worker
                worker.stop()

    def describe(self) -> str:
        return "\n".join(
            f"--- {w.name} (pid {w.process.pid if w.process else '-'}, "
            f"rc {w.process.poll() if w.process else '-'}) ---\n{w.log_tail()}"
            for w in self.workers
        )


# -- producing ----------------------------------------------------------------------------


@dataclass
class Produced:
    """Where a produced record landed."""

    key: bytes | None
    value: bytes | None
    partition: int
    offset: int


class RecordProducer:
    """Produces records and reports where each landed; one librdkafka producer, reused."""

    def __init__(self, settings: Settings, topic: str = CLICKS) -> None:
        self.producer = Producer(producer_config(settings))
        self.topic = settings.topic(topic)

    def send(
        self,
        records: Iterable[tuple[bytes | None, bytes | None]],
        partitions: Iterable[int] | None = None,
    ) -> list[Produced]:
        """Produce ``(key, value)`` records in order, wait for every acknowledgement."""
        out: list[Produced | None] = []
        errors: list[str] = []

        def delivered(index: int) -> Callable:
            def callback(err, msg) -> None:
                if err is not None:
                    errors.append(str(err))
                else:
                    out[index] = Produced(msg.key(), msg.value(), msg.partition(), msg.offset())

            return callback

        records = list(records)
        where = [-1] * len(records) if partitions is None else list(partitions)
        for (key, value), partition in zip(records, where, strict=True):
            out.append(None)
            while True:
                try:
                    self.producer.produce(
                        self.topic,
                        key=key,
                        value=value,
                        partition=partition,
                        on_delivery=delivered(len(out) - 1),
                    )
                    break
                except BufferError:
                    self.producer.poll(0.05)
            self.producer.poll(0)
        remaining = self.producer.flush(30)
        assert not remaining and not errors, f"produce failed: {remaining} pending, {errors[:3]}"
        assert all(p is not None for p in out)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.producer.flush(10)
        self.producer.close()


def produce_records(
    settings: Settings, records: Iterable[tuple[bytes | None, bytes | None]], topic: str = CLICKS
) -> list[Produced]:
    """Produce ``(key, value)`` records in order to ``topic``; return where each landed."""
    producer = RecordProducer(settings, topic)
    try:
        return producer.send(records)
    finally:
        producer.close()


def click_record(click: dict) -> tuple[bytes, bytes]:
    return click["user_id"].encode(), orjson.dumps(click)


class PacedProducer(threading.Thread):
    """Produces ``(key, value)`` click records at about ``rate`` per second in a thread,
    ``burst`` records at a time (one by default). Bursts suit the S3-backed broker of the
    restart test: each burst is a few large batches, where a steady trickle of small
    ones makes its fetches crawl (it lists every stored batch of a partition per fetch)."""

    def __init__(
        self,
        settings: Settings,
        records: list[tuple[bytes, bytes]],
        rate: float,
        burst: int = 1,
    ) -> None:
        super().__init__(name="paced-producer", daemon=True)
        self.settings = settings
        self.records = records
        self.rate = rate
        self.burst = burst
        self.sent = 0
        self.error: BaseException | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        try:
            producer = Producer(producer_config(self.settings))
            topic = self.settings.topic(CLICKS)
            started = time.perf_counter()
            for start in range(0, len(self.records), self.burst):
                delay = started + start / self.rate - time.perf_counter()
                if self.stop_event.wait(max(delay, 0.0)):
                    break
                for key, value in self.records[start : start + self.burst]:
                    while True:
                        try:
                            producer.produce(topic, key=key, value=value)
                            break
                        except BufferError:
                            producer.poll(0.05)
                producer.poll(0)
                self.sent = min(start + self.burst, len(self.records))
            assert producer.flush(60) == 0, "paced producer could not flush"
            producer.close()
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 60.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "paced producer did not finish"
        if self.error is not None:
            raise self.error


# -- reading topics back ------------------------------------------------------------------


@dataclass
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    def json(self) -> dict:
        assert self.value is not None
        return orjson.loads(self.value)


class TopicReader:
    """Reads a whole topic from offset 0 on every partition, incrementally.

    Not in a consumer group (``assign``), so it neither joins nor disturbs the workers'
    group. ``read_until`` polls until a predicate over everything read so far holds or
    the deadline passes; it never loops forever.
    """

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = settings.topic(topic)
        self.consumer = Consumer(consumer_config(settings, group_id=unique("reader")))
        metadata = self.consumer.list_topics(self.topic, timeout=10)
        partitions = sorted(metadata.topics[self.topic].partitions)
        assert partitions, f"topic {self.topic} has no partitions"
        self.consumer.assign([TopicPartition(self.topic, p, 0) for p in partitions])
        self.records: list[Record] = []

    def poll(self, timeout: float = 0.05) -> int:
        got = 0
        for msg in self.consumer.consume(10_000, timeout):
            if msg.error():
                continue
            self.records.append(Record(msg.partition(), msg.offset(), msg.key(), msg.value()))
            got += 1
        return got

    def read_until(
        self,
        done: Callable[[list[Record]], bool],
        timeout: float,
        alive: Callable[[], bool] | None = None,
    ) -> bool:
        """Poll until ``done(records)`` or ``timeout`` seconds pass; whether it got done.

        ``alive`` is checked after each poll: waiting stops early when it turns false
        (e.g. the worker process died), so a crash fails fast instead of timing out.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            if done(self.records):
                return True
            if time.monotonic() > deadline or (alive is not None and not alive()):
                self.poll()
                return done(self.records)

    def close(self) -> None:
        self.consumer.close()


class DecisionReader(TopicReader):
    """The decisions topic, with the decisions parsed and grouped by click_id."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings, DECISIONS)
        self.decisions: list[dict] = []
        self.by_click: dict[str, list[dict]] = {}

    def poll(self, timeout: float = 0.05) -> int:
        before = len(self.records)
        got = super().poll(timeout)
        for record in self.records[before:]:
            decision = record.json()
            self.decisions.append(decision)
            self.by_click.setdefault(decision["click_id"], []).append(decision)
        return got

    def wait_for(
        self,
        click_ids: Iterable[str],
        timeout: float,
        alive: Callable[[], bool] | None = None,
    ) -> set[str]:
        """Wait until every click in ``click_ids`` has a decision; return those missing."""
        wanted = set(click_ids)
        self.read_until(lambda _records: wanted <= self.by_click.keys(), timeout, alive)
        return wanted - self.by_click.keys()

    def wait_for_count(
        self, count: int, timeout: float, alive: Callable[[], bool] | None = None
    ) -> int:
        """Wait until ``count`` distinct clicks are decided; return how many are."""
        self.read_until(lambda _records: len(self.by_click) >= count, timeout, alive)
        return len(self.by_click)


def dlq_reader(settings: Settings) -> TopicReader:
    return TopicReader(settings, CLICKS_DLQ)


# -- a private Redis ----------------------------------------------------------------------


class PrivateRedis:
    """A Valkey server of this test's own on a fixed loopback port, stoppable by pid."""

    def __init__(self, workdir: Path, port: int) -> None:
        from stream.local_stack import redis_binary

        self.binary = redis_binary()
        self.workdir = workdir
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 20.0) -> None:
        import redis

        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
        ]
        with open(self.workdir / "redis.log", "ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"redis exited: {self.log_tail()}"
            client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                if int(client.info("server")["process_id"]) == self.process.pid:
                    return
            except (redis.RedisError, OSError):
                pass
            finally:
                client.close()
            assert time.monotonic() < deadline, f"redis did not answer: {self.log_tail()}"
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.workdir / "redis.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(step)
    return True
