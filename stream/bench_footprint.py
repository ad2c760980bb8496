"""``slidr bench``'s footprint phase: what a click costs Redis and RocksDB, counted rather
than timed, for the capacity model in deploy/README.md.

Clicks of a data set go through the worker's scoring path in process
(``DecisionEngine.process`` on 500-click micro-batches, partitioned by user as the
producer does), against the bench's Redis under a key prefix of its own and a fresh
RocksDB directory. Redis figures are differences of ``INFO`` before and after (nothing is
reset, so a shared Redis is left as it was, but its other traffic would be counted too);
key memory is ``MEMORY USAGE`` of the run's keys, grouped by window.
"""

from __future__ import annotations

import re
import secrets
import zlib
from pathlib import Path

import orjson
import redis
from rocksdict import Options, Rdict

from data.dataset import load_dataset
from events.settings import Settings
from models.registry import ModelRegistry
from stream.engine import DecisionEngine, RawMessage
from stream.kafka import CLICKS
from stream.state import PartitionStores, redis_client, shared_ip_state

BATCH = 500
# Commands a client sends around the work (connection set-up, INFO, script loading).
_HOUSEKEEPING = re.compile(r"^(info|hello|client.*|config.*|script.*|ping|memory.*|scan)$")
_SCRIPT_CALLS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall")
_WINDOW = re.compile(rb"(10s|1m|1h|1d):")  # keys end in <kind><window>:<bucket>
# RocksDB key prefixes (stream.state): user records, decided clicks, their day index.
_RECORD_KINDS = {b"e:": "user", b"c:": "decided_click", b"t:": "decided_click_day_index"}


def _calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _cpu_s(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    main = ("used_cpu_sys_main_thread", "used_cpu_user_main_thread")
    keys = main if all(k in cpu for k in main) else ("used_cpu_sys", "used_cpu_user")
    return sum(float(cpu[k]) for k in keys)


def _rocksdb_records(state_dir: Path) -> dict[str, dict[str, int]]:
    """Records and their key + value bytes, by kind, over every partition's store."""
    out = {kind: {"records": 0, "bytes": 0} for kind in (*_RECORD_KINDS.values(), "other")}
    for part in sorted(state_dir.glob("p*")):
        db = Rdict(str(part), Options(raw_mode=True))
        try:
            for key, value in db.items():
                # raw_mode: keys and values are bytes (rocksdict types them as any value)
                assert isinstance(key, bytes) and isinstance(value, bytes)
                kind = out[_RECORD_KINDS.get(key[:2], "other")]
                kind["records"] += 1
                kind["bytes"] += len(key) + len(value)
        finally:
            db.close()
    return out


def measure_footprint(
    settings: Settings, registry: Path, data: Path, clicks: int, workdir: Path
) -> dict:
    """Redis round trips, commands, network bytes, server CPU and key memory per click,
    and RocksDB bytes per active user and per decided click, for ``clicks`` clicks of
    ``data`` decided in process. ``settings`` names the Redis (``redis_url``) and its key
    prefix; the run adds a prefix of its own."""
    cols = load_dataset(data).clicks
    n = min(clicks, len(cols))
    rows = [cols.row(i) for i in range(n)]
    users = len({r["user_id"] for r in rows})
    ips = len({r["ip"] for r in rows})
    # A short prefix of the run's own: key bytes count in the memory figures, so the keys
    # stay within 5 bytes of a deployment's ("slidr:" by default).
    s = settings.replace(redis_key_prefix=f"{settings.redis_key_prefix}{secrets.token_hex(2)}:")
    client = redis_client(settings.redis_url, settings.redis_password, timeout_s=30.0)
    state_dir = workdir / "footprint-state"
    engine = DecisionEngine(
        ModelRegistry(registry).load(), PartitionStores(state_dir), shared_ip_state(s, s.redis_url)
    )
    calls0, cpu0, stats0 = _calls(client), _cpu_s(client), client.info("stats")
    memory0 = int(client.info("memory")["used_memory"])
    degraded = 0
    for start in range(0, n, BATCH):
        chunk = rows[start : start + BATCH]
        messages = [
            # The producer's partitioner hashes the key; any stable hash of user_id keeps a
            # user's state in one store, which is what the figures depend on.
            RawMessage(orjson.dumps(r), CLICKS, zlib.crc32(r["user_id"].encode()) % 4, start + j)
            for j, r in enumerate(chunk)
        ]
        degraded += engine.process(messages).degraded
    calls1, cpu1, stats1 = _calls(client), _cpu_s(client), client.info("stats")
    memory1 = int(client.info("memory")["used_memory"])
    engine.user_state.close()

    pattern = f"{s.redis_key_prefix}{s.topic_prefix}*"
    names = list(client.scan_iter(match=pattern, count=5000))
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
    by_window: dict[str, dict[str, float]] = {}
    for name, size in zip(names, pipe.execute(), strict=True):
        found = _WINDOW.search(name)
        window = by_window.setdefault(
            found.group(1).decode() if found else "other", {"keys": 0, "bytes": 0}
        )
        window["keys"] += 1
        window["bytes"] += size or 0
    for window in by_window.values():
        window["bytes_per_click"] = round(window["bytes"] / n, 1)
    for start in range(0, len(names), 1000):  # the run's keys: the Redis is left as it was
        client.delete(*names[start : start + 1000])
    client.close()

    delta = {k: v - calls0.get(k, 0) for k, v in calls1.items() if v > calls0.get(k, 0)}
    round_trips = sum(v for k, v in delta.items() if k in _SCRIPT_CALLS)
    inside = {
        k: v for k, v in delta.items() if k not in _SCRIPT_CALLS and not _HOUSEKEEPING.match(k)
    }
    cpu_per_click_s = (cpu1 - cpu0) / n
    records = _rocksdb_records(state_dir)
    disk = sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file())
    user, decided = records["user"], records["decided_click"]
    index = records["decided_click_day_index"]
    return {
        "clicks": n,
        "users": users,
        "ips": ips,
        "event_time_hours": round((rows[-1]["ts"] - rows[0]["ts"]) / 3600, 1),
        "degraded_batches": degraded,
        "redis": {
            "round_trips_per_click": round(round_trips / n, 4),
            "commands_per_click": round(sum(inside.values()) / n, 2),
            "commands": dict(sorted(inside.items(), key=lambda kv: -kv[1])),
            "net_in_bytes_per_click": round(
                (stats1["total_net_input_bytes"] - stats0["total_net_input_bytes"]) / n
            ),
            "net_out_bytes_per_click": round(
                (stats1["total_net_output_bytes"] - stats0["total_net_output_bytes"]) / n
            ),
            "server_cpu_us_per_click": round(cpu_per_click_s * 1e6, 2),
            "clicks_per_s_per_server_core": round(1 / cpu_per_click_s) if cpu_per_click_s else None,
            "used_memory_bytes_per_click": round((memory1 - memory0) / n),
            "keys_by_window": by_window,
        },
        "rocksdb": {
            "records": records,
            "user_record_bytes": round(user["bytes"] / max(user["records"], 1)),
            "decided_click_bytes": round(
                (decided["bytes"] + index["bytes"]) / max(decided["records"], 1)
            ),
            "disk_bytes": disk,
            "disk_bytes_per_user": round(disk / max(users, 1)),
        },
    }
