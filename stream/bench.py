"""``slidr bench``: the scoring path in process, and the pipeline through the broker.

Figures are medians and percentiles of one run, printed with the machine and the
settings that produced them. Nothing here asserts a time: tests never time things.

1. scoring path: ``DecisionEngine.process`` (parse, feature update in RocksDB and Redis,
   ONNX inference, thresholds, decision records) on micro-batches, per click;
2. throughput: a backlog of clicks decided by one Faust worker process, beside a plain
   confluent-kafka loop running the same engine, and by 1 against N worker processes
   (``stream.bench_fleet``: the ratio, with the broker's and Redis's CPU shares);
3. latency: clicks produced at a fixed rate, produce time to decision available, beside
   a bare produce -> consume round trip through the same broker at the same rate;
4. footprint: Redis operations, bytes and CPU per click, RocksDB bytes per user and per
   decided click (``stream.bench_footprint``; counted, for deploy/README.md's capacity
   model).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
from confluent_kafka import Producer

from data.dataset import load_dataset
from events.settings import Settings
from models.bench import cpu_model
from models.registry import ModelRegistry
from stream.engine import DecisionEngine, RawMessage
from stream.kafka import CLICKS, DECISIONS, ensure_topics, producer_config
from stream.producer import click_payload, produce_dataset
from stream.state import PartitionStores, shared_ip_state
from stream.topics import BEGINNING, TopicTail


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }


def cpu_probe_ms() -> float:
    """Milliseconds for a fixed single-threaded workload of the kind the worker does
    (dicts, strings, JSON), best of three. Timed around each benchmark phase, it tells
    machine drift from code changes: on this project's shared 2-core host it reads about
    20.5 ms at the usual speed and 35-40 ms in slow spells that come and go within
    seconds."""
    record = {"click_id": "c", "ts": 1.5, "user_id": "u", "context": {"q": "shoes"}}

    def work() -> None:
        fields: dict[str, int] = {}
        for i in range(20_000):
            fields["c1m:" + str(i % 500)] = fields.get("c1m:" + str(i % 500), 0) + 1
            orjson.loads(orjson.dumps(record))

    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def _probed(phase: Callable[[], dict]) -> dict:
    """Run a benchmark phase with ``cpu_probe_ms`` before and after it in its result:
    a figure taken while the probe moved was taken on a drifting machine."""
    before = cpu_probe_ms()
    result = phase()
    result["cpu_probe_ms"] = {"before": before, "after": cpu_probe_ms()}
    return result


def percentiles(values_s: list[float] | np.ndarray) -> dict:
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    if a.size == 0:
        return {}
    return {
        "n": int(a.size),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "p99.9_ms": round(float(np.percentile(a, 99.9)), 3),
        "max_ms": round(float(a.max()), 3),
    }


def p99_by_sixth(values_s: list[float]) -> list[float]:
    """p99 (ms) of each sixth of the messages received, in send order: shows whether
    latency grows during a run."""
    if len(values_s) < 6:
        return []
    return [round(float(np.percentile(part, 99)) * 1000, 1) for part in np.array_split(values_s, 6)]


def _unique(settings: Settings, label: str) -> Settings:
    tag = f"bench{uuid.uuid4().hex[:6]}-{label}-"
    s = settings.replace(topic_prefix=tag, redis_key_prefix=f"slidr:{tag}", group_id=f"{tag}group")
    ensure_topics(s)
    return s


def _engine(settings: Settings, registry: Path, state_dir: Path) -> DecisionEngine:
    model = ModelRegistry(registry).load()
    return DecisionEngine(
        model, PartitionStores(state_dir), shared_ip_state(settings, settings.redis_url)
    )


def bench_scoring_path(settings: Settings, registry: Path, data: Path, clicks: int) -> dict:
    """Per-click cost of the in-process scoring path, at batch sizes 1 and 500."""
    cols = load_dataset(data).clicks
    n = min(clicks, len(cols))
    payloads = [click_payload(cols, i) for i in range(n)]
    out = {}
    for batch in (1, 500):
        s = _unique(settings, f"path{batch}")
        with tempfile.TemporaryDirectory() as tmp:
            engine = _engine(s, registry, Path(tmp))
            count = n if batch > 1 else min(n, 5000)
            messages = [
                RawMessage(payloads[i], CLICKS, hash(cols.user_id[i]) % 4, i) for i in range(count)
            ]
            engine.process(messages[:batch])  # warm-up: ONNX session, agent parsing caches
            per_click, started = [], time.perf_counter()
            for start in range(batch, count, batch):
                chunk = messages[start : start + batch]
                t0 = time.perf_counter()
                engine.process(chunk)
                per_click.extend([(time.perf_counter() - t0) / len(chunk)] * len(chunk))
            elapsed = time.perf_counter() - started
            out[f"batch_{batch}"] = {
                "clicks_per_s": round((count - batch) / elapsed),
                "per_click": percentiles(per_click),
                "provider": engine.model.scorer.provider,
            }
            engine.user_state.close()
    return out


class ArrivalWatcher(threading.Thread):
    """Reads a topic (``decisions`` by default) from offset 0 and notes when each key
    (a decision's ``click_id``) arrived."""

    def __init__(self, settings: Settings, topic: str = DECISIONS, label: str = "watch") -> None:
        super().__init__(daemon=True)
        # Messages are timed as they arrive (``stream.topics.arrived_now``).
        self.tail = TopicTail(
            settings, [topic], start=BEGINNING, label=label, wait_s=0.05, as_arrived=True
        )
        self.arrived: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        with self.tail:
            for messages in self.tail.batches(stop=self.stop):
                now = time.time()  # one clock read per fetch: the watcher shares the CPUs
                for msg in messages:
                    key = msg.key()  # a decision's click_id: every decision has one
                    if key is not None:
                        self.arrived.setdefault(key.decode(), now)

    def wait_for(
        self,
        count: int,
        timeout_s: float,
        worker: subprocess.Popen | None = None,
    ) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.arrived) >= count:
                return True
            if worker is not None and worker.poll() not in (None, 0):
                raise RuntimeError(f"the worker exited with code {worker.returncode}; see its log")
            time.sleep(0.05)
        return False


_TUNING = (
    "batch_size",
    "batch_wait_ms",
    "fetch_wait_ms",
    "linger_ms",
    "decision_linger_ms",
    "session_timeout_ms",
    "partitions",
    "state_changelog",
)


def _child_env(settings: Settings, registry: Path, home: Path, transport: str = "aiokafka") -> dict:
    return {
        **os.environ,
        "SLIDR_FAUST_TRANSPORT": transport,
        "SLIDR_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SLIDR_REDIS_URL": settings.redis_url,
        "SLIDR_REGISTRY": str(registry),
        "SLIDR_HOME": str(home),
        "SLIDR_TOPIC_PREFIX": settings.topic_prefix,
        "SLIDR_REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "SLIDR_GROUP_ID": settings.group_id,
        "SLIDR_WORKER_PROCESSES": "1",  # one process, as the report says; --scaling for more
        # the tuning the report prints, whether it came from the environment or not
        **{f"SLIDR_{name.upper()}": str(getattr(settings, name)) for name in _TUNING},
    }


def start_worker(
    settings: Settings,
    registry: Path,
    home: Path,
    log_path: Path,
    transport: str = "aiokafka",
    command: tuple[str, ...] = ("-m", "slidr", "worker"),
) -> subprocess.Popen:
    """``slidr worker`` (or ``command``) in a process of its own, logging to ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, *command],
            env=_child_env(settings, registry, home, transport),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_worker(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _decide_backlog(
    settings: Settings,
    registry: Path,
    data: Path,
    clicks: int,
    workdir: Path,
    label: str,
    transport: str = "aiokafka",
    command: tuple[str, ...] = ("-m", "slidr", "worker"),
) -> dict:
    """Produce a backlog, start ``command`` on it, and time the decisions a watcher reads:
    clicks/s from the first decision (after the group join) to the last."""
    s = _unique(settings, label)
    clicks = produce_dataset(
        s, data, limit=clicks, progress=False
    ).clicks  # the data may hold fewer
    watcher = ArrivalWatcher(s)
    watcher.start()
    proc = start_worker(
        s, registry, workdir / f"home-{label}", workdir / f"worker-{label}.log", transport, command
    )
    try:
        done = watcher.wait_for(clicks, timeout_s=max(120.0, clicks / 500), worker=proc)
        times = sorted(watcher.arrived.values())
    finally:
        stop_worker(proc)
        watcher.stop.set()
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "clicks": len(times),
        "complete": done,
        "clicks_per_s": round(len(times) / span) if span > 0 else None,
    }


def bench_throughput(
    settings: Settings,
    registry: Path,
    data: Path,
    clicks: int,
    workdir: Path,
    transports: tuple[str, ...] = ("aiokafka", "confluent"),
) -> dict:
    """Sustained clicks/s on a pre-produced backlog: Faust worker (each of faust-streaming's
    Kafka drivers) vs the plain confluent-kafka loop running the same engine."""
    out = {}
    for transport in transports:
        out[f"faust_worker_{transport}"] = _decide_backlog(
            settings, registry, data, clicks, workdir, f"faust-{transport}", transport=transport
        )
    # The plain loop runs in a process of its own too, and is timed the same way.
    out["plain_loop"] = _decide_backlog(
        settings,
        registry,
        data,
        clicks,
        workdir,
        "plain",
        command=("-m", "stream.plain_loop", "--max-clicks", str(clicks)),
    )
    for transport in transports:
        rate = out[f"faust_worker_{transport}"]["clicks_per_s"]
        if rate and out["plain_loop"]["clicks_per_s"]:
            ratio = rate / out["plain_loop"]["clicks_per_s"]
            out[f"faust_{transport}_to_plain_ratio"] = round(ratio, 3)
    return out


def _paced(rate: float, seconds: float):
    started = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        yield i


def bench_latency(
    settings: Settings, registry: Path, data: Path, rate: float, seconds: float, workdir: Path
) -> dict:
    """End-to-end latency at ``rate`` clicks/s, and the bare broker round trip."""
    out = {}
    # Bare round trip: produce -> consume through the same broker, same client settings.
    s = _unique(settings, "echo")
    topic = s.topic(CLICKS)
    reader = ArrivalWatcher(s, CLICKS, label="echo")
    reader.start()
    producer = Producer(producer_config(s))
    sent: dict[str, float] = {}
    for i in _paced(rate, seconds):
        key = str(i)
        sent[key] = time.time()
        producer.produce(topic, key=key.encode(), value=b"x" * 300)
        producer.poll(0)
    producer.flush(30)
    reader.wait_for(len(sent), 30)
    reader.stop.set()
    reader.join(5)
    received = reader.arrived
    echo = [received[k] - t for k, t in sent.items() if k in received]
    out["bare_round_trip"] = {
        "rate": rate,
        "received": len(echo),
        "of": len(sent),
        **percentiles(echo),
        "p99_by_sixth_ms": p99_by_sixth(echo),
    }

    # slidr: producer -> worker -> decisions, at the same rate.
    s = _unique(settings, "latency")
    cols = load_dataset(data).clicks
    watcher = ArrivalWatcher(s)
    watcher.start()
    proc = start_worker(s, registry, workdir / "latency-home", workdir / "latency-worker.log")
    producer = Producer(producer_config(s))
    produced: dict[str, float] = {}
    try:
        # Warm-up click: wait until the worker has joined its group and decided it.
        producer.produce(
            s.topic(CLICKS), key=cols.user_id[0].encode(), value=click_payload(cols, 0)
        )
        producer.flush(10)
        if not watcher.wait_for(1, 120, worker=proc):
            raise RuntimeError(
                f"worker decided nothing within 120 s; see {workdir / 'latency-worker.log'}"
            )
        n = len(cols)
        for i in _paced(rate, seconds):
            j = 1 + i % (n - 1)
            payload = orjson.loads(click_payload(cols, j))
            payload["click_id"] = f"lat-{i}"
            produced[payload["click_id"]] = time.time()
            producer.produce(
                s.topic(CLICKS), key=cols.user_id[j].encode(), value=orjson.dumps(payload)
            )
            producer.poll(0)
        producer.flush(30)
        watcher.wait_for(len(produced) + 1, 60)
    finally:
        stop_worker(proc)
        watcher.stop.set()
    lat = [watcher.arrived[c] - t for c, t in produced.items() if c in watcher.arrived]
    out["slidr_end_to_end"] = {
        "rate": rate,
        "decided": len(lat),
        "of": len(produced),
        **percentiles(lat),
        "p99_by_sixth_ms": p99_by_sixth(lat),
    }
    if out["bare_round_trip"].get("p50_ms") is not None and lat:
        out["added_by_slidr_ms"] = {
            k: round(out["slidr_end_to_end"][k] - out["bare_round_trip"][k], 3)
            for k in ("p50_ms", "p99_ms", "p99.9_ms")
        }
    return out


@dataclass
class BenchOptions:
    offline_clicks: int = 1_000_000
    stream_clicks: int = 100_000
    rate: float = 2000.0
    latency_seconds: float = 30.0
    offline: bool = True
    stream: bool = True
    # faust-streaming's Kafka drivers to run: "aiokafka" (its default) and/or "confluent".
    transports: tuple[str, ...] = ("aiokafka",)
    # N of "1 worker process against N" (stream.bench_fleet); 0: one per core.
    scaling_processes: int = 0


def run_bench(settings: Settings, options: BenchOptions, progress=print) -> dict:
    """Every benchmark; starts a private embedded stack unless Kafka and Redis are given."""
    from data.simulator import simulate
    from models.pipeline import TrainOptions, run_training
    from stream.local_stack import LocalStack

    report: dict = {
        "machine": machine(),
        "settings": {name: getattr(settings, name) for name in _TUNING},
    }
    with tempfile.TemporaryDirectory(prefix="slidr-bench-") as tmp:
        work = Path(tmp)
        if options.offline:
            from models.bench import run_offline_bench

            progress(
                f"offline: features and training on {options.offline_clicks:,} simulated clicks"
            )
            report["offline"] = run_offline_bench(
                options.offline_clicks, work / "offline", progress
            )
        if not options.stream:
            return report
        progress("stream: simulating and training a model for the stream benchmarks")
        per_day = max(8000, options.stream_clicks // 3)  # smaller days trip data guardrails
        simulate(work / "data", days=3, seed=11, clicks_per_day=per_day)
        registry = work / "registry"
        run_training(
            work / "data",
            ModelRegistry(registry),
            TrainOptions(min_coverage=0.0),
            progress=lambda m: None,
        )
        stack = None
        if not (settings.kafka_bootstrap and settings.redis_url):
            stack = LocalStack(work / "home")
            info = stack.up()
            settings = settings.replace(
                kafka_bootstrap=info.bootstrap, redis_url=info.redis_url, home=work / "home"
            )
        try:
            progress("stream: scoring path in process")
            report["scoring_path"] = _probed(
                lambda: bench_scoring_path(settings, registry, work / "data", options.stream_clicks)
            )
            progress(f"stream: throughput on a backlog of {options.stream_clicks:,} clicks")
            report["throughput"] = _probed(
                lambda: bench_throughput(
                    settings,
                    registry,
                    work / "data",
                    options.stream_clicks,
                    work,
                    options.transports,
                )
            )
            from stream.bench_fleet import bench_scaling
            from stream.supervisor import default_processes

            servers = {} if stack is None else {"broker": info.broker_pid, "redis": info.redis_pid}
            report["scaling"] = _probed(
                lambda: bench_scaling(
                    settings,
                    registry,
                    work / "data",
                    options.stream_clicks,
                    work,
                    options.scaling_processes or default_processes(),
                    servers,
                    progress,
                )
            )
            progress(
                f"stream: end-to-end latency at {options.rate:,.0f} clicks/s "
                f"for {options.latency_seconds:.0f} s"
            )
            report["latency"] = _probed(
                lambda: bench_latency(
                    settings, registry, work / "data", options.rate, options.latency_seconds, work
                )
            )
            from stream.bench_footprint import measure_footprint

            progress("stream: Redis and RocksDB footprint per click (counted, not timed)")
            report["footprint"] = measure_footprint(
                settings, registry, work / "data", options.stream_clicks, work
            )
        finally:
            if stack is not None:
                stack.down()
    return report
