"""``slidr bench --adversarial``: hostile traffic through the in-process decision engine,
in phases, showing that the cost of a click and the memory it leaves behind stay flat.

Issue 12 asks that no input cost without bound. Each phase decides ``phase_clicks``
clicks (one event-time day of them) through ``DecisionEngine.process`` in micro-batches,
with RocksDB user state in a temporary directory and shared state in Redis (a private
Valkey unless ``SLIDR_REDIS_URL`` names one), and reports:

- ``us_per_click_p50`` / ``_p90``: over the phase's batches, the batch's time divided
  by its clicks (median and 90th percentile of batches);
- ``rss_mib``: the process's resident memory at the end of the phase (``/proc``), and
  ``feature_caches``: entries in the featurizer's caches by string, which grow with new
  strings until their entry bounds (~0.5 GiB at most, ``features/limits.py``; a phase of
  4,000 unique agents fills a sixteenth of the agent caches) and then hold;
- ``cpu_probe_ms``: a fixed workload timed before and after the phase
  (``stream.bench.cpu_probe_ms``): a phase that ran slow on a busy machine shows there;
- ``rocksdb``: entity records (keys, value bytes, the largest one), stored decisions,
  and the bytes on disk;
- ``redis``: ``used_memory``, the keys under the run's prefix, and the most members
  any of its distinct sets holds.

The traffic is a round robin of five kinds of click, each built to grow something:

- ``unique_agent``: a user agent never seen before, 200 to 4096 characters, so past the
  512 the features read (``features/limits.py``), from a pool of 200 users;
- ``rotator``: one user id, a new IP and a new session each click (some ids longer than
  the distinct sets' members are, so they enter as digests);
- ``shared_ip``: one IP, a new user and session each click;
- ``wide_context``: 24 context keys (some over the key cap) with new values each click,
  and new long ad, advertiser and query values;
- ``normal``: 2,000 users on 500 IPs with five usual agents.

Event time is compressed (a day a phase) and the engine sweeps expired state by event
time only (``min_sweep_interval_s`` 0; the worker waits a minute of wall time between
sweeps), so what outlives its windows is gone by the end of each phase. Stored decisions
are kept for the day after their click's day (duplicate detection), so they level off
from the second phase on, and entities that never come back (the shared IP's users) from
the third. Redis keys expire on the wall clock (a bucket's key lives two windows plus
the allowed lateness, in seconds), which compressed time does not reach: its keys and
memory grow with the new IPs and buckets of the run, a fixed amount a click, while no
set holds more than the cap. Nothing here asserts a time.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import orjson

from events.settings import Settings
from features import context, definitions
from features.windows import DAY_S
from models.registry import ModelRegistry
from models.testing import register_logistic_model
from stream.bench import cpu_probe_ms, machine
from stream.engine import DecisionEngine, RawMessage
from stream.kafka import CLICKS
from stream.state import PartitionStores, redis_client, shared_ip_state

KINDS = ("unique_agent", "rotator", "shared_ip", "wide_context", "normal")
PARTITIONS = 4
START_TS = 1_735_689_600.0  # 2025-01-01 00:00 UTC: long past, so no click is ahead
_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "ShopApp/5.2.1 (Linux; Android 14; Pixel 8)",
)
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789 ;/()."


@dataclass
class AdversarialOptions:
    phases: int = 5
    phase_clicks: int = 20_000
    batch_size: int = 500
    seed: int = 12


class AdversarialTraffic:
    """Clicks of the five ``KINDS`` in turn, ``clicks_per_day`` of them per event day."""

    def __init__(self, clicks_per_day: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.step_s = DAY_S / clicks_per_day
        self.count = 0

    def _text(self, n: int) -> str:
        return "".join(self.rng.choices(_LETTERS, k=n))

    def clicks(self, n: int) -> Iterator[dict]:
        for _ in range(n):
            i = self.count
            self.count += 1
            kind = KINDS[i % len(KINDS)]
            click: dict = {
                "click_id": f"adv-{i}",
                "ts": START_TS + i * self.step_s,
                "user_id": f"user-{self.rng.randrange(2000)}",
                "ip": f"192.0.2.{self.rng.randrange(250)}:{self.rng.randrange(2)}",
                "user_agent": _AGENTS[i % len(_AGENTS)],
                "ad_id": f"ad-{self.rng.randrange(50)}",
                "context": {"publisher": f"p{self.rng.randrange(10)}"},
            }
            getattr(self, "_" + kind)(click, i)
            yield click

    def _unique_agent(self, click: dict, i: int) -> None:
        click["user_id"] = f"farm-{self.rng.randrange(200)}"
        length = self.rng.randrange(200, 4097)
        head = f"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/124.0.{i} "
        click["user_agent"] = (head + self._text(length))[:length]

    def _rotator(self, click: dict, i: int) -> None:
        click["user_id"] = "rotator"
        click["session_id"] = f"s-{i}" if i % 3 else f"s-{i}-{self._text(200)}"
        click["ip"] = f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"
        if i % 7 == 0:
            click["ip"] = f"2001:db8::{i:x}:{self._text(80)}"

    def _shared_ip(self, click: dict, i: int) -> None:
        click["ip"] = "198.51.100.7"
        click["user_id"] = f"nat-{i}"
        click["session_id"] = f"nat-s-{i}"

    def _wide_context(self, click: dict, i: int) -> None:
        keys = [f"k{j}-{self._text(self.rng.choice((8, 40, 100)))}" for j in range(24)]
        click["context"] = {k: f"{i}-{self._text(self.rng.randrange(1, 300))}" for k in keys}
        click["ad_id"] = f"ad-{i}-{self._text(150)}"
        click["advertiser_id"] = f"adv-{i}"
        click["query"] = f"q{i} " + self._text(self.rng.randrange(10, 400))

    def _normal(self, click: dict, i: int) -> None:
        pass


def rss_mib() -> float:
    """Resident memory of this process, MiB (``/proc/self/status``; 0 where absent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


# The featurizer's caches by string (each bounded by its entry count, features/limits.py):
# they fill as new strings come and hold the process's memory until full.
_CACHES = (
    context.token_slot,
    context.id_bucket,
    context.context_slot,
    definitions.agent_features,
    definitions.ad_ids,
    definitions.query_ids,
    definitions.context_ids,
    definitions.agent_ids,
)


def cache_fill() -> dict:
    """Entries in the featurizer's caches, and the most they may hold."""
    infos = [cache.cache_info() for cache in _CACHES]
    return {
        "entries": sum(i.currsize for i in infos),
        "bound": sum(i.maxsize or 0 for i in infos),
    }


def rocksdb_state(stores: PartitionStores) -> dict:
    """Entity records and stored decisions over every open partition, and disk bytes."""
    records = record_bytes = largest = decisions = 0
    for store in stores.stores.values():
        # raw mode: keys and values are bytes (the stubs list the key types of every mode)
        for key, value in cast("Iterator[tuple[bytes, bytes]]", store.db.items()):
            if key.startswith(b"e:"):
                records += 1
                record_bytes += len(value)
                largest = max(largest, len(value))
            elif key.startswith(b"c:"):
                decisions += 1
    disk = sum(f.stat().st_size for f in stores.root.rglob("*") if f.is_file())
    return {
        "records": records,
        "record_bytes": record_bytes,
        "largest_record_bytes": largest,
        "decisions": decisions,
        "disk_bytes": disk,
    }


def redis_state(url: str, prefix: str) -> dict:
    """``used_memory``, the keys under ``prefix``, and its distinct sets: how many, and
    the most members one holds."""
    client = redis_client(url, timeout_s=10.0)
    try:
        keys = sum(1 for _ in client.scan_iter(match=prefix + "*", count=1000))
        sets = list(client.scan_iter(match=prefix + "*", count=1000, _type="set"))
        pipe = client.pipeline(transaction=False)
        for key in sets:
            pipe.scard(key)
        sizes = pipe.execute() if sets else []
        return {
            "used_memory": int(client.info("memory")["used_memory"]),
            "keys": keys,
            "sets": len(sets),
            "largest_set": max(sizes, default=0),
        }
    finally:
        client.close()


def run_adversarial_bench(
    settings: Settings, options: AdversarialOptions, progress: Callable[[str], None]
) -> dict:
    """Decide ``options.phases`` phases of adversarial traffic; a report of each phase.

    Starts a private embedded stack (Valkey is what it uses) unless ``settings`` name a
    Redis."""
    from stream.local_stack import LocalStack

    report: dict = {
        "machine": machine(),
        "options": vars(options),
        "model": "logistic, written by models.testing (ONNX; scoring is not what grows)",
        "phases": [],
    }
    with tempfile.TemporaryDirectory(prefix="slidr-adversarial-") as tmp:
        work = Path(tmp)
        stack = None
        if not settings.redis_url:
            stack = LocalStack(work / "home")
            settings = settings.replace(redis_url=stack.up().redis_url)
        try:
            report["phases"] = _run_phases(settings, options, work, progress)
        finally:
            if stack is not None:
                stack.down()
    return report


def _run_phases(
    settings: Settings, options: AdversarialOptions, work: Path, progress: Callable[[str], None]
) -> list[dict]:
    registry = ModelRegistry(work / "registry")
    register_logistic_model(registry, {"ua_crawler": 6.0, "u_clicks_1m": 0.5}, bias=-4.0)
    settings = settings.replace(redis_key_prefix=f"slidr:adversarial{int(time.time())}:")
    prefix = settings.redis_key_prefix + settings.topic_prefix  # as shared_ip_state keys
    user_state = PartitionStores(work / "state")
    engine = DecisionEngine(
        registry.load(), user_state, shared_ip_state(settings, settings.redis_url)
    )
    # Compressed time: sweep as event time passes, not once a minute of wall time.
    engine.featurizer.min_sweep_interval_s = 0.0
    traffic = AdversarialTraffic(options.phase_clicks, options.seed)
    offsets = [0] * PARTITIONS
    phases = []
    try:
        for phase in range(1, options.phases + 1):
            per_click_us, degraded, dead_letters = [], 0, 0
            probe_before = cpu_probe_ms()
            clicks = list(traffic.clicks(options.phase_clicks))
            for start in range(0, len(clicks), options.batch_size):
                messages = []
                for click in clicks[start : start + options.batch_size]:
                    p = zlib.crc32(click["user_id"].encode()) % PARTITIONS
                    messages.append(RawMessage(orjson.dumps(click), CLICKS, p, offsets[p]))
                    offsets[p] += 1
                started = time.perf_counter()
                result = engine.process(messages)
                per_click_us.append((time.perf_counter() - started) / len(messages) * 1e6)
                degraded += result.degraded
                dead_letters += len(result.dead_letters)
            rocksdb, redis_now = rocksdb_state(user_state), redis_state(settings.redis_url, prefix)
            cache = cache_fill()
            figures = {
                "phase": phase,
                "clicks": len(clicks),
                "us_per_click_p50": round(statistics.median(per_click_us), 1),
                "us_per_click_p90": round(statistics.quantiles(per_click_us, n=10)[-1], 1),
                "degraded_batches": degraded,
                "dead_letters": dead_letters,
                "cpu_probe_ms": {"before": probe_before, "after": cpu_probe_ms()},
                "rss_mib": rss_mib(),
                "feature_caches": cache,
                "rocksdb": rocksdb,
                "redis": redis_now,
            }
            phases.append(figures)
            progress(
                f"phase {phase}: {figures['us_per_click_p50']} us/click (p50 of batches), "
                f"RSS {figures['rss_mib']} MiB, {cache['entries']:,} cached strings, "
                f"RocksDB {rocksdb['records']} records / "
                f"{rocksdb['record_bytes']:,} B (largest {rocksdb['largest_record_bytes']:,} B), "
                f"{rocksdb['decisions']} decisions, Redis {redis_now['used_memory']:,} B / "
                f"{redis_now['keys']} keys, largest set {redis_now['largest_set']}"
            )
    finally:
        user_state.close()
        _delete_keys(settings.redis_url, prefix)
    return phases


def _delete_keys(url: str, prefix: str) -> None:
    """Leave a Redis named by the settings as it was found."""
    client = redis_client(url, timeout_s=10.0)
    try:
        batch = []
        for key in client.scan_iter(match=prefix + "*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch = []
        if batch:
            client.delete(*batch)
    finally:
        client.close()
