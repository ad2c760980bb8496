"""Feature state for the stream worker: RocksDB per partition, Redis shared, and a fallback.

- ``PartitionStores``: user-keyed state, one RocksDB directory per Kafka partition of
  ``clicks`` (keyed by ``user_id``, so a user's state lives with the partition that
  owns its clicks). Each entity is one record, read once and written once per batch;
  the writes of a batch go in one ``WriteBatch`` together with the batch's decisions, so
  after a crash a click is either fully applied (and its decision is re-emitted as it
  was) or not at all.
- ``RedisStore``: state shared by all workers (IPs, combinations of fields), one Lua
  script call per batch with one row per click and entity (the script derives keys,
  buckets and TTLs from the plans), sent before the user state is folded and read after
  it (``StateStore.submit_plans``), so Valkey's share of a batch does not add to the
  worker's.
- ``ClusterRedisStore``: the same state on a Redis Cluster (``SLIDR_REDIS_MODE=cluster``):
  keys hash-tagged by slot group, a batch split into one script call per group and sent
  as one pipeline per primary.
- ``ResilientStore``: Redis with an in-process fallback; while Redis is unreachable or
  answers with an error (``READONLY``, ``OOM``, ``NOPERM``, ...) the worker keeps
  deciding with local counters and marks those decisions degraded.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast
from zlib import crc32

import orjson
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from rocksdict import Options, Rdict, WriteBatch

from features.limits import MAX_DISTINCT_MEMBERS
from features.store import MemoryStore, Row, RowPlan, StateStore, apply_plan, expire_record
from features.windows import DAY_S

if TYPE_CHECKING:
    from events.settings import Settings

log = logging.getLogger(__name__)

_USER_PREFIX = b"e:"
# Decided clicks (duplicate detection). A click's decision is stored under its
# ``click_id`` alone, "c:<click_id>", so a copy of the click finds it whatever its own
# ``ts``: a producer that resends a click may stamp it anew, and a resend across
# midnight must not be decided (and counted) twice. Bounded in time by a second key per
# decision, "t:<day of the click's ts>:<click_id>" (empty value): expiry deletes the
# decisions listed under days that are over and then those days' index keys as one
# range, so it reads only what it deletes (the index costs one more put a decision,
# ~1 us in a WriteBatch). A decision is kept until the event-time horizon passes the end
# of the day after its click's day: at least a day of event time, for redeliveries after
# a crash and resends that come within it.
_DECIDED_PREFIX = b"c:"
_DECIDED_BY_DAY_PREFIX = b"t:"
_DAY_DIGITS = 6  # day numbers since the epoch; LATEST_TS (year 3000) is day 376,200
# Decisions were once keyed by day first, "d:<day>:<click_id>"; expiry drops those.
_OLD_DECIDED_PREFIX, _OLD_DECIDED_END = b"d:", b"d;"


class RocksStore(StateStore):
    """One partition's state in RocksDB: entity records and decided clicks."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self.path = path
        self.db = Rdict(str(path), options)
        self._pending: dict[bytes, dict[str, list]] = {}
        self._horizon = -math.inf  # fields that expired before this are dropped on load
        self._old_decisions_dropped = False  # see _OLD_DECIDED_PREFIX

    def _load(self, key: bytes) -> dict[str, list]:
        record = self._pending.get(key)
        if record is None:
            raw = self._stored(key)
            record = orjson.loads(raw) if raw is not None else {}
            if record:
                expire_record(record, self._horizon)
            self._pending[key] = record
        return record

    def execute_rows(self, plan: RowPlan, rows: Sequence[Row], now: float = 0.0) -> list[Any]:
        results: list[Any] = []
        load = self._load
        for entity, ts, members in rows:
            apply_plan(load(_USER_PREFIX + entity.encode()), plan, ts, members, results)
        return results

    def set_horizon(self, before: float) -> None:
        self._horizon = max(self._horizon, before)

    def _stored(self, key: bytes) -> bytes | None:
        """A key's value as committed (``stream.changelog`` adds the writes its log has
        not acknowledged yet)."""
        return self.db.get(key)

    def _held(self, key: bytes) -> bool:
        """Whether ``key`` has changes not in the database yet (expiry leaves it be)."""
        return key in self._pending

    def decided(self, key: DecisionKey) -> bytes | None:
        """The decision already made for a click (after a crash, a redelivery or a
        resend), by its ``decision_key``."""
        return self._stored(key.stored_at)

    def commit(self, decisions: Sequence[tuple[DecisionKey, bytes]] = ()) -> None:
        """Write the batch's state changes and its ``(decision_key, decision)`` pairs
        atomically."""
        records = [
            (key, orjson.dumps(record) if record else None) for key, record in self._pending.items()
        ]
        self._write(records, decisions)
        self._pending.clear()

    def _write(
        self,
        records: Sequence[tuple[bytes, bytes | None]],
        decisions: Sequence[tuple[DecisionKey, bytes]],
    ) -> None:
        """Put (or, for None, delete) ``records`` and store ``decisions``, in one batch."""
        batch = WriteBatch(raw_mode=True)
        for key, value in records:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)
        for where, decision in decisions:
            batch.put(where.stored_at, decision)
            batch.put(where.listed_at, b"")
        self.db.write(batch)

    def discard(self) -> None:
        """Forget the changes folded since the last commit (a batch that failed half way):
        the next load reads the records as committed, so a retried batch counts once."""
        self._pending.clear()

    def expire(self, before: float) -> int:
        """Drop expired fields, empty records and the decisions of clicks of days before
        ``before - 1 day``."""
        self._horizon = max(self._horizon, before)
        removed = 0
        batch = WriteBatch(raw_mode=True)
        changed: list[tuple[bytes, bytes | None]] = []  # (key, new value or None: deleted)
        # raw_mode: keys and values are bytes (the stubs list the key types of every mode).
        entries = cast("Iterator[tuple[bytes, bytes]]", self.db.items(from_key=_USER_PREFIX))
        for key, raw in entries:
            if not key.startswith(_USER_PREFIX):
                break
            if self._held(key):
                continue
            record = orjson.loads(raw)
            dropped = expire_record(record, before)
            if dropped:
                removed += dropped
                value = orjson.dumps(record) if record else None
                changed.append((key, value))
                if value is None:
                    batch.delete(key)
                else:
                    batch.put(key, value)
        self.db.write(batch)
        changed.extend((key, None) for key in self._expire_decisions(before))
        self._expired(changed)
        return removed

    def _expired(self, changed: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Told what an expiry sweep wrote (``stream.changelog`` logs it)."""

    def _expire_decisions(self, before: float) -> list[bytes]:
        """Forget the decisions of clicks whose day ended more than a day before
        ``before`` (see ``_DECIDED_PREFIX``); return their keys."""
        kept_from = _day_index_prefix(int(before // DAY_S) - 1)
        batch = WriteBatch(raw_mode=True)
        listed = cast("Iterator[bytes]", self.db.keys(from_key=_DECIDED_BY_DAY_PREFIX))
        click_id_at = len(kept_from)
        forgotten: list[bytes] = []
        for key in listed:
            if key >= kept_from:
                break
            forgotten.append(_DECIDED_PREFIX + key[click_id_at:])
            batch.delete(forgotten[-1])
        self.db.write(batch)
        self.db.delete_range(_DECIDED_BY_DAY_PREFIX, kept_from)
        if not self._old_decisions_dropped:  # once a store: a range delete leaves a marker
            self.db.delete_range(_OLD_DECIDED_PREFIX, _OLD_DECIDED_END)
            self._old_decisions_dropped = True
        return forgotten

    def close(self) -> None:
        self.db.close()


class DecisionKey(NamedTuple):
    """Where a click's decision is stored (``stored_at``, by click id) and listed for
    expiry (``listed_at``, under its click's day); see ``_DECIDED_PREFIX``."""

    stored_at: bytes
    listed_at: bytes


def _day_index_prefix(day: int) -> bytes:
    return _DECIDED_BY_DAY_PREFIX + b"%0*d:" % (_DAY_DIGITS, max(day, 0))


def decision_key(click_id: str, ts: float) -> DecisionKey:
    """The keys of a click's decision: looked up by ``click_id`` alone, expired by the
    day of ``ts`` (epoch seconds)."""
    encoded = click_id.encode()
    return DecisionKey(_DECIDED_PREFIX + encoded, _day_index_prefix(int(ts // DAY_S)) + encoded)


class PartitionStores(StateStore):
    """A ``RocksStore`` per partition under ``root/p<N>``, opened on first use."""

    def __init__(self, root: Path, open_timeout_s: float = 30.0) -> None:
        self.root = root
        self.open_timeout_s = open_timeout_s
        self.stores: dict[int, RocksStore] = {}

    def store(self, partition: int) -> RocksStore:
        store = self.stores.get(partition)
        if store is None:
            store = self.stores[partition] = self._open(partition)
        return store

    def _open(self, partition: int) -> RocksStore:
        # After a rebalance the previous owner on this host may still hold the lock for
        # a moment: retry until it closes the directory.
        deadline = time.monotonic() + self.open_timeout_s
        while True:
            try:
                return self._new_store(partition)
            except Exception as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _new_store(self, partition: int) -> RocksStore:
        return RocksStore(self.root / f"p{partition}")

    def execute_rows(self, plan: RowPlan, rows: Sequence[Row], now: float = 0.0) -> list[Any]:
        raise TypeError("PartitionStores needs routes: use execute_routed_rows")

    def execute_routed_rows(
        self, plan: RowPlan, rows: dict[int, list[Row]], now: float = 0.0
    ) -> dict[int, list[Any]]:
        """Apply ``plan`` to each partition's rows on that partition's store; results by
        partition."""
        return {p: self.store(p).execute_rows(plan, p_rows, now) for p, p_rows in rows.items()}

    def set_horizon(self, before: float) -> None:
        for store in self.stores.values():
            store.set_horizon(before)

    def discard(self) -> None:
        """``RocksStore.discard`` on every open partition."""
        for store in self.stores.values():
            store.discard()

    def expire(self, before: float) -> int:
        return sum(store.expire(before) for store in self.stores.values())

    def release(self, partitions: Sequence[int]) -> None:
        """Close the stores of partitions this worker no longer owns."""
        for partition in partitions:
            store = self.stores.pop(partition, None)
            if store is not None:
                store.close()

    def close(self) -> None:
        self.release(list(self.stores))


# Plans applied to rows (RowPlan). KEYS[1] is the key prefix every key the script touches
# starts with (on a cluster it ends in the call's hash tag, so the declared key names the
# one slot all of them hash to: see ClusterRedisStore). ARGV[2] says how many plans; each
# then takes two ARGV entries: its header, "rows width late steps" joined by \x1d (width:
# fields per row; steps: "kind seconds prefix flag" joined by \x1f, steps joined by
# \x1e), and its rows, every row's fields (ts, entity, members...) joined by \x1f, rows
# after rows. Keys, buckets and times to live are computed here, so the worker sends ~40
# bytes a click and entity instead of six formatted ops, and one argument per plan rather
# than per row (redis-py spends ~0.2 us packing each). Buckets use exact floor division
# (the quotient's rounding is corrected), as Python's ``ts // seconds`` does.
#
# A key's time to live is counted from the event time of the click that wrote it, not
# from the watermark (ARGV[1], ``now``, is read but no longer used for it): the bucket's
# expiry time ``(b + 2) * s + late`` minus the click's own ``ts``, so at least one window
# length plus the allowed lateness, whatever other clicks said the time was. Measured
# from the watermark, one click from the far future (or a partition catching up on a
# backlog while another is live) gave every key the floor, and keys vanished while their
# windows were still being counted. Live, event time follows the wall clock and a key
# lives as long as its window is read; a backlog runs through event time faster than
# the wall clock, so its keys outlive their windows a little (memory, never counts); a
# late click's keys live at most two windows plus the lateness. What this cannot cover:
# a stream that stops for longer than a window (a worker down) finds its keys expired.
_ROWS_LUA = r"""
local find, sub, call, floor, fmt = string.find, string.sub, redis.call, math.floor, string.format
local now, keyp, nplans = tonumber(ARGV[1]), KEYS[1], tonumber(ARGV[2])
local late = 0 -- the current plan's
local function bucket(ts, s)
  local b = floor(ts / s)
  if b * s > ts then b = b - 1 elseif (b + 1) * s <= ts then b = b + 1 end
  return b
end
local function ttl(b, s, ts)
  return floor((b + 2) * s + late - ts) + 1
end
local out, n = {}, 0
local fields = {}
for j = 1, nplans do
  local nrows, width, plan_late, steps =
    string.match(ARGV[1 + 2 * j], '^(%d+)\29(%d+)\29([^\29]+)\29(.*)$')
  nrows, width, late = tonumber(nrows), tonumber(width), tonumber(plan_late)
  local plan = {}
  for item in string.gmatch(steps, '[^\30]+') do
    local k, s, p, f = string.match(item, '^(%a)\31(%d+)\31([^\31]*)\31(%d+)$')
    plan[#plan + 1] = {k, tonumber(s), p, tonumber(f)}
  end
  local rows, pos = ARGV[2 + 2 * j], 1
  for _ = 1, nrows do
    for m = 1, width do
      local c = find(rows, '\31', pos, true)
      if c then
        fields[m] = sub(rows, pos, c - 1)
        pos = c + 1
      else
        fields[m] = sub(rows, pos)
        pos = #rows + 2
      end
    end
    local ts = tonumber(fields[1])
    local base = keyp .. fields[2] .. '|'
    for _, step in ipairs(plan) do
      local kind, s, p, f = step[1], step[2], step[3], step[4]
      if kind == 'c' then -- INCR the bucket, then maybe GET the previous one
        local b = bucket(ts, s)
        local key = base .. p .. fmt('%d', b)
        local r = call('INCR', key)
        if r == 1 then call('EXPIRE', key, ttl(b, s, ts)) end
        n = n + 1
        out[n] = r
        if f == 1 then
          local prev = call('GET', base .. p .. fmt('%d', b - 1))
          n = n + 1
          out[n] = prev and tonumber(prev) or false
        end
      elseif kind == 'l' then -- MAX of today's last click time, then GET yesterday's
        local day = bucket(ts, s)
        local key = base .. p .. fmt('%d', day)
        local r = call('GET', key)
        if (not r) or ts > tonumber(r) then call('SET', key, fields[1], 'EX', ttl(day, s, ts)) end
        n = n + 1
        out[n] = r
        n = n + 1
        out[n] = call('GET', base .. p .. fmt('%d', day - 1))
      else -- 'd': SADD the member unless the set is full, then the set's size
        local b = bucket(ts, s)
        local key = base .. p .. fmt('%d', b)
        local size = call('SCARD', key)
        if size < distinct_cap and call('SADD', key, fields[3 + f]) == 1 then
          size = size + 1
          call('EXPIRE', key, ttl(b, s, ts))
        end
        n = n + 1
        out[n] = size
      end
    end
  end
end
return out
"""
# Distinct sets take at most MAX_DISTINCT_MEMBERS (features/limits.py), as in apply_op.
_ROWS_LUA = f"local distinct_cap = {MAX_DISTINCT_MEMBERS}\n" + _ROWS_LUA


@functools.lru_cache(maxsize=64)
def _plan_arg(plan: RowPlan) -> str:
    """A plan as ``_ROWS_LUA`` reads it in a header, after the row count and width."""
    steps = [f"c\x1f{s}\x1f{prefix}\x1f{int(previous)}" for s, prefix, previous in plan.counts]
    if plan.last_seen:
        steps.append(f"l\x1f{DAY_S}\x1flast:\x1f0")
    steps.extend(f"d\x1f{s}\x1f{prefix}\x1f{member}" for s, prefix, member in plan.distincts)
    return f"{float(plan.lateness_s)!r}\x1d" + "\x1e".join(steps)


def redis_client(url: str, password: str = "", timeout_s: float = 1.0) -> redis.Redis:
    """A client that fails fast (no retries) so a Redis outage degrades, not stalls."""
    return redis.Redis.from_url(
        url,
        password=password or None,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class _RoundTripStore(StateStore):
    """A store behind a network round trip: ``submit_plans`` sends, and ``execute_rows``
    is a submission read at once."""

    def execute_rows(self, plan: RowPlan, rows: Sequence[Row], now: float = 0.0) -> list[Any]:
        return self.submit_rows(plan, rows, now)()


class RedisStore(_RoundTripStore):
    """Shared state (IPs, combinations) in Redis, for every worker; keys expire by TTL.

    ``submit_plans`` writes the batch's script call and returns at once; the answer is
    read when its result is asked for. Valkey runs the script (8.1 ms a 500-click call
    of the IP plan alone, `INFO commandstats`, on the other core) while the worker folds
    the same batch into its RocksDB state.
    """

    def __init__(self, client: redis.Redis, prefix: str = "slidr:") -> None:
        self.client = client
        self.prefix = prefix
        self._script = client.register_script(_ROWS_LUA)

    def submit_plans(
        self, jobs: Sequence[tuple[RowPlan, Sequence[Row]]], now: float = 0.0
    ) -> Callable[[], list[list[Any]]]:
        jobs = list(jobs)
        if not any(rows for _, rows in jobs):
            return lambda: [[] for _ in jobs]
        args = _script_args(jobs, now)
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_command("EVALSHA", self._script.sha, 1, self.prefix, *args)
        except BaseException:
            pool.release(conn)  # a failed send has already disconnected it
            raise

        def result() -> list[list[Any]]:
            try:
                try:
                    out = conn.read_response()
                finally:
                    pool.release(conn)  # after a failed read too: it is disconnected then
            except redis.exceptions.NoScriptError:
                # Redis lost its scripts (a restart): the script object loads it again.
                out = self._script(keys=[self.prefix], args=args)
            return _split_results(jobs, out)

        return result

    def expire(self, before: float) -> int:
        return 0  # Redis expires keys by their TTL


# Slot groups of a Redis Cluster. A script call may touch only keys of one slot, and one
# call per entity would make a 500-click batch ~1,000 calls (an IP row and several
# combination rows per click). Each entity is therefore put in one of ``slot_groups``
# groups (CRC32 of its name: the same in every worker process) and all keys of a group
# carry the group's hash tag, "<prefix>{<tag>}<entity>|<field>": a batch is at most
# ``slot_groups`` script calls (16 by default), each the same script over its group's
# rows, sent as one pipeline per primary, every pipeline written before any is read. So
# a batch costs one round trip per primary, in parallel, and Valkey's share of it is
# spread over the primaries. More groups spread a group's load more finely over more
# shards; fewer make fewer, larger calls.
_CLUSTER_SLOTS = 16384
MAX_SLOT_GROUPS = 1024


@functools.lru_cache(maxsize=8)
def slot_group_tags(groups: int) -> tuple[str, ...]:
    """One hash tag per slot group, the i-th hashing into the i-th of ``groups`` equal
    ranges of the cluster's 16,384 slots, so primaries that own equal slot ranges get
    equal shares of the groups (tags taken at random would not). The same in every
    process: the first of "s0", "s1", ... that falls in each range."""
    if not 1 <= groups <= MAX_SLOT_GROUPS:
        raise ValueError(f"slot groups must be 1..{MAX_SLOT_GROUPS}, got {groups}")
    tags: list[str | None] = [None] * groups
    missing, n = groups, 0
    while missing:
        tag = f"s{n}"
        group = key_slot(tag.encode()) * groups // _CLUSTER_SLOTS
        if tags[group] is None:
            tags[group] = tag
            missing -= 1
        n += 1
    return tuple(cast("list[str]", tags))


def redis_cluster_client(url: str, password: str = "", timeout_s: float = 1.0) -> RedisCluster:
    """A Redis Cluster client that fails fast. It connects (reads the slot map) when
    built, so build it where a failure degrades (``ClusterRedisStore`` does). One retry
    after a connection error, which redis-py makes on its refreshed slot map: a replica
    promoted after a failover then answers the same batch."""
    return RedisCluster.from_url(
        url,
        password=password or None,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )


class ClusterRedisStore(_RoundTripStore):
    """Shared state (IPs, combinations) on a Redis Cluster, through redis-py's
    ``RedisCluster`` (which follows MOVED and ASK and refreshes its slot map after a
    failover); the same script and keys as ``RedisStore`` but for the slot group's hash
    tag in every key (see ``slot_group_tags``).

    ``submit_plans`` hands the batch's pipelines to a sender thread and returns; the
    answer is awaited when its result is asked for, so the primaries run the scripts
    while the worker folds the batch into its RocksDB state (redis-py's cluster pipeline
    has no split send and read). The client is built on the sender thread at the first
    batch: a cluster that cannot be reached then fails that batch (degraded), not the
    worker's start.

    An answer not back within ``answer_timeout_s`` fails the batch (``TimeoutError``).
    redis-py resends each command of a pipeline that met a connection error or timeout
    on its own, so a primary that vanishes without refusing connections (a network
    partition) would otherwise hold one batch for a socket timeout per slot group; the
    late answer, if any, is dropped (the counts it made stay, as with a lost answer).
    """

    def __init__(
        self,
        connect: Callable[[], RedisCluster],
        prefix: str = "slidr:",
        slot_groups: int = 16,
        answer_timeout_s: float = 2.0,
    ) -> None:
        self.connect = connect
        self.answer_timeout_s = answer_timeout_s
        self.prefix = prefix
        self.slot_keys = [f"{prefix}{{{tag}}}" for tag in slot_group_tags(slot_groups)]
        self.client: RedisCluster | None = None
        self._sha = hashlib.sha1(_ROWS_LUA.encode()).hexdigest()
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="slidr-redis-cluster")

    def submit_plans(
        self, jobs: Sequence[tuple[RowPlan, Sequence[Row]]], now: float = 0.0
    ) -> Callable[[], list[list[Any]]]:
        jobs = list(jobs)
        if not any(rows for _, rows in jobs):
            return lambda: [[] for _ in jobs]
        groups = len(self.slot_keys)
        by_group: dict[int, list[list[Row]]] = {}  # each job's rows of each slot group
        row_groups: list[list[int]] = []  # each row's group, to put the answers in order
        for j, (_, rows) in enumerate(jobs):
            placed = [crc32(row[0].encode()) % groups for row in rows]
            row_groups.append(placed)
            for group, row in zip(placed, rows, strict=True):
                parts = by_group.get(group)
                if parts is None:
                    parts = by_group[group] = [[] for _ in jobs]
                parts[j].append(row)
        calls = [
            (group, [(plan, parts[j]) for j, (plan, _) in enumerate(jobs)])
            for group, parts in by_group.items()
        ]
        sent = self._sender.submit(
            self._run,
            [(self.slot_keys[g], _script_args(group_jobs, now)) for g, group_jobs in calls],
        )

        def result() -> list[list[Any]]:
            try:
                answers = sent.result(timeout=self.answer_timeout_s)
            except FutureTimeout:
                raise redis.TimeoutError(
                    f"no answer from the Redis Cluster within {self.answer_timeout_s} s"
                ) from None
            by_call = {
                group: _split_results(group_jobs, out)
                for (group, group_jobs), out in zip(calls, answers, strict=True)
            }
            merged = []
            for j, (plan, _) in enumerate(jobs):
                width, taken = plan.width, dict.fromkeys(by_call, 0)
                out: list[Any] = []
                for group in row_groups[j]:
                    at = taken[group]
                    out.extend(by_call[group][j][at : at + width])
                    taken[group] = at + width
                merged.append(out)
            return merged

        return result

    def _run(self, calls: list[tuple[str, list[str]]]) -> list[Any]:
        """On the sender thread: every call's answer, or the first error raised."""
        client = self.client
        if client is None:
            client = self.client = self.connect()
            # On every primary; a primary that missed it answers NOSCRIPT, below.
            client.script_load(_ROWS_LUA)
        answers = self._pipeline(client, calls)
        lost = [i for i, a in enumerate(answers) if isinstance(a, redis.exceptions.NoScriptError)]
        if lost:
            # A primary without the script: restarted, or a replica promoted after a
            # failover (SCRIPT LOAD is not replicated). Load it on every primary, resend.
            client.script_load(_ROWS_LUA)
            resent = self._pipeline(client, [calls[i] for i in lost])
            for i, answer in zip(lost, resent, strict=True):
                answers[i] = answer
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers

    def _pipeline(self, client: RedisCluster, calls: list[tuple[str, list[str]]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for slot_key, args in calls:
            pipe.execute_command("EVALSHA", self._sha, 1, slot_key, *args)
        return pipe.execute(raise_on_error=False)

    def expire(self, before: float) -> int:
        return 0  # Redis expires keys by their TTL

    def close(self) -> None:
        self._sender.shutdown(wait=True)
        if self.client is not None:
            self.client.close()


def _script_args(jobs: Sequence[tuple[RowPlan, Sequence[Row]]], now: float) -> list[str]:
    """The ARGV of one ``_ROWS_LUA`` call that runs ``jobs``."""
    args = [repr(float(now)), str(len(jobs))]
    for plan, rows in jobs:
        width = 2 + (len(rows[0][2]) if rows else 0)
        args.append(f"{len(rows)}\x1d{width}\x1d{_plan_arg(plan)}")
        args.append(_rows_arg(rows, width))
    return args


def _rows_arg(rows: Sequence[Row], width: int) -> str:
    """Rows as ``_ROWS_LUA`` reads them: every field joined by \\x1f."""
    if not rows:
        return ""
    if width == 2:
        text = "\x1f".join([f"{ts!r}\x1f{entity}" for entity, ts, _ in rows])
    else:
        text = "\x1f".join(
            ["\x1f".join((repr(ts), entity, *members)) for entity, ts, members in rows]
        )
    # parse_click keeps control characters out of ids; JSON keeps them out of combination
    # entities. Checked in one scan, as a miscount would shift every later row.
    if text.count("\x1f") != width * len(rows) - 1:
        for entity, _, members in rows:
            if len(members) != width - 2 or any("\x1f" in f for f in (entity, *members)):
                raise ValueError(f"a state key or member contains \\x1f: {(entity, members)!r}")
    return text


def _split_results(jobs: Sequence[tuple[RowPlan, Sequence[Row]]], out: list) -> list[list[Any]]:
    """The script's flat answer cut into one result list per job. Counts and set sizes
    come back as integers (or None); last-seen times as the strings stored."""
    results, at = [], 0
    for plan, rows in jobs:
        width = plan.width
        part = out[at : at + width * len(rows)]
        at += width * len(rows)
        if plan.last_seen:
            _, last_seen_at, _ = plan.offsets()
            for start in range(last_seen_at, len(part), width):
                for i in (start, start + 1):
                    if part[i] is not None:
                        part[i] = float(part[i])
        results.append(part)
    return results


# What a Redis that cannot serve the batch raises: every redis-py error, the answers
# included (ResponseError: READONLY after a failover, OOM, NOPERM, a failing script;
# NOSCRIPT is answered first by loading the script again, see RedisStore), besides an
# unreachable or restarting server (ConnectionError, TimeoutError, BusyLoadingError,
# OSError). On a cluster also CLUSTERDOWN, CROSSSLOT and TRYAGAIN (RedisErrors too) and
# redis-py's RedisClusterException, which is not one: no reachable node, a slot that no
# node serves. Each degrades the batch's decisions, never the batch.
_REDIS_DOWN = (redis.RedisError, RedisClusterException, OSError)


class ResilientStore(StateStore):
    """Redis when it answers, local memory when it does not; ``degraded`` says which.

    After a failure Redis is retried every ``retry_after_s`` seconds of wall-clock time
    (the only wall clock here: it is about the dependency, not the events).
    """

    def __init__(self, primary: StateStore, retry_after_s: float = 2.0) -> None:
        self.primary = primary
        self.fallback = MemoryStore()
        self.retry_after_s = retry_after_s
        self.degraded = False  # the last batch used the fallback
        self._failed_at = -math.inf

    def execute_rows(self, plan: RowPlan, rows: Sequence[Row], now: float = 0.0) -> list[Any]:
        return self.submit_rows(plan, rows, now)()

    def submit_plans(
        self, jobs: Sequence[tuple[RowPlan, Sequence[Row]]], now: float = 0.0
    ) -> Callable[[], list[list[Any]]]:
        """Redis's answer when the send and the read succeed, else the local fallback's
        (and ``degraded``): all of a batch's jobs from one or all from the other."""
        if time.monotonic() - self._failed_at >= self.retry_after_s:
            try:
                pending = self.primary.submit_plans(jobs, now)
            except _REDIS_DOWN as exc:
                self._down(exc)
            else:

                def result() -> list[list[Any]]:
                    try:
                        out = pending()
                    except _REDIS_DOWN as exc:
                        self._down(exc)
                        return self._local(jobs, now)
                    if self.degraded:
                        log.warning("Redis is back: shared counters restored")
                        self.fallback = MemoryStore()
                    self.degraded = False
                    return out

                return result
        out = self._local(jobs, now)
        return lambda: out

    def _down(self, exc: Exception) -> None:
        self._failed_at = time.monotonic()
        if not self.degraded:
            log.warning(
                "Redis failed (%s: %s): deciding with local counters", type(exc).__name__, exc
            )

    def _local(self, jobs: Sequence[tuple[RowPlan, Sequence[Row]]], now: float) -> list[list[Any]]:
        self.degraded = True
        return [self.fallback.execute_rows(plan, rows, now) for plan, rows in jobs]

    def expire(self, before: float) -> int:
        return self.fallback.expire(before)

    def close(self) -> None:
        self.primary.close()


def shared_ip_state(settings: Settings, redis_url: str) -> ResilientStore:
    """The worker's shared state (IPs and combinations): Redis under the settings' key and
    topic prefixes, with the local fallback. Every engine that decides live clicks builds it
    here: a Redis Cluster's (``ClusterRedisStore``) with ``SLIDR_REDIS_MODE=cluster``."""
    prefix = settings.redis_key_prefix + settings.topic_prefix
    if settings.redis_mode == "cluster":
        password = settings.redis_password
        return ResilientStore(
            ClusterRedisStore(
                lambda: redis_cluster_client(redis_url, password),
                prefix=prefix,
                slot_groups=settings.redis_slot_groups,
            )
        )
    return ResilientStore(RedisStore(redis_client(redis_url, settings.redis_password), prefix))
