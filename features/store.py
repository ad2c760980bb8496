"""Where feature state lives: a small interface, the reference semantics, and the
in-memory implementation.

Every click asks the same questions of its user and of its IP, so state is requested as
*rows* under a *plan* (``RowPlan``): a row is one click for one entity (``u:<user_id>``,
``i:<ip>``, or ``c:<combination>:<values>``), and the plan says which fields of that
entity it counts, reads and adds to. One call per micro-batch lets a backend answer it
in one round trip (Redis runs it as one Lua script, several plans at once with
``submit_plans``; RocksDB reads and writes each entity's record once).

What a plan means is defined by the primitive operations it expands to
(``RowPlan.expand``), applied in order by ``apply_op``. Every store returns exactly
those results; ``MemoryStore.execute`` runs the ops themselves, as the reference the
tests compare stores with. Results by kind:

- ``INCR``: the field's new count (a missing field counts from 0);
- ``GET``: the field's value, or ``None``;
- ``SADD``: the number of distinct members in the field's set after adding ``arg``,
  at most ``MAX_DISTINCT_MEMBERS``: a full set takes no new member, so the answer is
  ``min(distinct members added, MAX_DISTINCT_MEMBERS)`` (``features/limits.py``);
- ``MAX``: the field's previous value (or ``None``), keeping the larger of it and ``arg``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from features.limits import MAX_DISTINCT_MEMBERS
from features.windows import DAY_S

INCR, GET, SADD, MAX = 0, 1, 2, 3


# An operation is a plain tuple (kind, entity, field, arg, expire_at):
#   arg: SADD the member, MAX the value, unused otherwise
#   expire_at: event time (epoch seconds) after which the field may go
Op = tuple  # (int, str, str, Any, float)


# A row of a plan: (entity, event time, members) with members in the plan's order.
Row = tuple  # (str, float, tuple[str, ...])


@dataclass(frozen=True)
class RowPlan:
    """The ops that every row (a click, for one of its entities) applies, in this order:

    1. per count ``(seconds, field_prefix, previous)``: INCR of the row's tumbling bucket
       ``field_prefix + str(int(ts // seconds))``, then with ``previous`` a GET of the
       bucket before it;
    2. with ``last_seen``: MAX of ``last:<day>`` with the event time, then a GET of the
       previous day's ``last:`` field;
    3. per distinct ``(seconds, field_prefix, member)``: SADD of ``members[member]`` to
       the row's bucket (a set of at most ``MAX_DISTINCT_MEMBERS``).

    A bucket's fields expire two buckets after it starts, plus ``lateness_s``: the next
    bucket still reads it as its previous one.
    """

    counts: tuple[tuple[int, str, bool], ...]
    last_seen: bool
    distincts: tuple[tuple[int, str, int], ...]
    lateness_s: float

    def offsets(self) -> tuple[tuple[int, ...], int, tuple[int, ...]]:
        """Where each step's first result sits among a row's results: per count (its
        previous bucket follows it), the last-seen time (yesterday's follows it), per
        distinct."""
        counts, at = [], 0
        for _, _, previous in self.counts:
            counts.append(at)
            at += 1 + previous
        last_seen_at = at
        at += 2 * self.last_seen
        return tuple(counts), last_seen_at, tuple(range(at, at + len(self.distincts)))

    @property
    def width(self) -> int:
        """Ops (and results) per row."""
        _, last_seen_at, _ = self.offsets()
        return last_seen_at + 2 * self.last_seen + len(self.distincts)

    def expand_row(self, row: Row) -> list[Op]:
        entity, ts, members = row
        late = self.lateness_s
        ops: list[Op] = []
        for seconds, prefix, previous in self.counts:
            b = int(ts // seconds)
            ops.append((INCR, entity, prefix + str(b), None, (b + 2) * seconds + late))
            if previous:
                ops.append((GET, entity, prefix + str(b - 1), None, 0.0))
        if self.last_seen:
            day = int(ts // DAY_S)
            ops.append((MAX, entity, f"last:{day}", ts, (day + 2) * DAY_S + late))
            ops.append((GET, entity, f"last:{day - 1}", None, 0.0))
        for seconds, prefix, member in self.distincts:
            b = int(ts // seconds)
            ops.append((SADD, entity, prefix + str(b), members[member], (b + 2) * seconds + late))
        return ops

    def expand(self, rows: Sequence[Row]) -> list[Op]:
        return [op for row in rows for op in self.expand_row(row)]


def apply_plan(
    record: dict[str, list], plan: RowPlan, ts: float, members: tuple, out: list
) -> None:
    """Apply one row's plan to its entity's record, appending one result per op to
    ``out``: the results of ``apply_op`` over ``plan.expand_row``, without building the
    ops (this runs ~10 ops per click in the worker)."""
    late = plan.lateness_s
    get = record.get
    for seconds, prefix, previous in plan.counts:
        b = int(ts // seconds)
        field = prefix + str(b)
        slot = get(field)
        if slot is None:
            record[field] = [1, (b + 2) * seconds + late]
            out.append(1)
        else:
            slot[0] += 1
            out.append(slot[0])
        if previous:
            slot = get(prefix + str(b - 1))
            out.append(None if slot is None else slot[0])
    if plan.last_seen:
        day = int(ts // DAY_S)
        field = f"last:{day}"
        slot = get(field)
        if slot is None:
            record[field] = [ts, (day + 2) * DAY_S + late]
            out.append(None)
        else:
            out.append(slot[0])
            if ts > slot[0]:
                slot[0] = ts
        slot = get(f"last:{day - 1}")
        out.append(None if slot is None else slot[0])
    for seconds, prefix, member in plan.distincts:
        b = int(ts // seconds)
        field = prefix + str(b)
        slot = get(field)
        value = members[member]
        if slot is None:
            record[field] = [[value], (b + 2) * seconds + late]
            out.append(1)
        else:
            values = slot[0]
            if len(values) < MAX_DISTINCT_MEMBERS and value not in values:
                values.append(value)
            out.append(len(values))


class StateStore(ABC):
    """Keyed feature state. Implementations: memory (here), RocksDB and Redis (stream/)."""

    @abstractmethod
    def execute_rows(self, plan: RowPlan, rows: Sequence[Row], now: float = 0.0) -> list[Any]:
        """Apply ``plan`` to every row in order; the results of ``apply_op`` over
        ``plan.expand(rows)``, ``plan.width`` per row.

        ``now`` is the newest event time seen, for stores that turn expiry times into a
        time-to-live (Redis).
        """

    @abstractmethod
    def expire(self, before: float) -> int:
        """Forget every field whose ``expire_at`` is before event time ``before``.

        Returns the number of fields removed. Called as the event-time watermark moves,
        so users who went quiet do not hold memory.
        """

    def submit_plans(
        self, jobs: Sequence[tuple[RowPlan, Sequence[Row]]], now: float = 0.0
    ) -> Callable[[], list[list[Any]]]:
        """Start ``execute_rows`` of each ``(plan, rows)`` job, in order; the returned
        function gives one result list per job.

        A store behind a network round trip (Redis) sends every job here, as one request,
        and reads the answer when the function is called, so the caller can work
        meanwhile. Call it exactly once, also when the caller's own work fails (an unread
        answer holds a connection). This default simply executes the jobs now.
        """
        results = [self.execute_rows(plan, rows, now) for plan, rows in jobs]
        return lambda: results

    def submit_rows(
        self, plan: RowPlan, rows: Sequence[Row], now: float = 0.0
    ) -> Callable[[], list[Any]]:
        """``submit_plans`` of one job: the returned function gives its results."""
        pending = self.submit_plans([(plan, rows)], now)
        return lambda: pending()[0]

    def set_horizon(self, before: float) -> None:  # noqa: B027 - optional hook
        """Fields that expired before event time ``before`` may be dropped whenever the
        store touches them. Called every batch (``expire`` is the full, slower sweep)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (files, connections)."""


class PartitionedStore(Protocol):
    """A user store that keeps state per Kafka partition (the worker's ``PartitionStores``):
    ``ClickFeaturizer.featurize`` sends it each partition's rows when told the partitions."""

    def execute_routed_rows(
        self, plan: RowPlan, rows: dict[int, list[Row]], now: float = 0.0
    ) -> dict[int, list[Any]]:
        """``execute_rows`` of each partition's rows on that partition's state."""
        ...


def apply_op(record: dict[str, list], op: Op) -> Any:
    """Apply one op to an entity record ``{field: [value, expire_at]}``; return its result.

    The reference semantics of every store (see the module docstring).
    """
    kind, _, field, arg, expire_at = op
    slot = record.get(field)
    if kind == INCR:
        if slot is None:
            record[field] = [1, expire_at]
            return 1
        slot[0] += 1
        return slot[0]
    if kind == GET:
        return None if slot is None else slot[0]
    if kind == SADD:
        if slot is None:
            record[field] = [[arg], expire_at]
            return 1
        members = slot[0]
        if len(members) < MAX_DISTINCT_MEMBERS and arg not in members:
            members.append(arg)
        return len(members)
    if kind == MAX:
        if slot is None:
            record[field] = [arg, expire_at]
            return None
        previous = slot[0]
        if arg > previous:
            slot[0] = arg
        return previous
    raise ValueError(f"unknown state op kind {kind}")


def expire_record(record: dict[str, list], before: float) -> int:
    """Drop fields of one record that expired before ``before``; return how many."""
    stale = [name for name, (_, expire_at) in record.items() if expire_at < before]
    for name in stale:
        del record[name]
    return len(stale)


class MemoryStore(StateStore):
    """State in a dict: the offline path, unit tests, the worker's Redis fallback, and
    (``execute``) the reference that runs plain ops."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, list]] = {}

    def execute(self, ops: Sequence[Op]) -> list[Any]:
        """Apply ``ops`` in order; one result per op (see the module docstring)."""
        records = self._records
        return [apply_op(records.setdefault(op[1], {}), op) for op in ops]  # op[1]: entity

    def execute_rows(self, plan: RowPlan, rows: Sequence[Row], now: float = 0.0) -> list[Any]:
        records = self._records
        results: list[Any] = []
        for entity, ts, members in rows:
            record = records.get(entity)
            if record is None:
                record = records[entity] = {}
            apply_plan(record, plan, ts, members, results)
        return results

    def expire(self, before: float) -> int:
        removed = 0
        empty = []
        for entity, record in self._records.items():
            removed += expire_record(record, before)
            if not record:
                empty.append(entity)
        for entity in empty:
            del self._records[entity]
        return removed

    def __len__(self) -> int:
        return len(self._records)
