"""Where feature state lives: a small interface and the in-memory implementation.

Features ask for state through a list of primitive operations, executed in order. One
list per micro-batch lets a backend answer it in one round trip (Redis runs it as one
Lua script; RocksDB reads and writes each entity's record once). Operations address a
*field* of an *entity* (``u:<user_id>`` or ``i:<ip>``) and carry the event time after
which the field may be forgotten.

Results by kind:

- ``INCR``: the field's new count (a missing field counts from 0);
- ``GET``: the field's value, or ``None``;
- ``SADD``: the number of distinct members in the field's set after adding ``arg``;
- ``MAX``: the field's previous value (or ``None``), keeping the larger of it and ``arg``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

INCR, GET, SADD, MAX = 0, 1, 2, 3


# An operation is a plain tuple (kind, entity, field, arg, expire_at): building ~16 of
# them per click is on the hot path, and a plain tuple is 3x cheaper than a NamedTuple.
#   arg: SADD the member, MAX the value, unused otherwise
#   expire_at: event time (epoch seconds) after which the field may go
Op = tuple  # (int, str, str, Any, float)
ENTITY = 1  # position of the entity in an op (stores group ops by it)


class StateStore(ABC):
    """Keyed feature state. Implementations: memory (here), RocksDB and Redis (stream/)."""

    @abstractmethod
    def execute(self, ops: Sequence[Op], now: float = 0.0) -> list[Any]:
        """Apply ``ops`` in order; return one result per op (see the module docstring).

        ``now`` is the newest event time seen, for stores that turn ``expire_at`` into a
        time-to-live (Redis).
        """

    @abstractmethod
    def expire(self, before: float) -> int:
        """Forget every field whose ``expire_at`` is before event time ``before``.

        Returns the number of fields removed. Called as the event-time watermark moves,
        so users who went quiet do not hold memory.
        """

    def submit(self, ops: Sequence[Op], now: float = 0.0) -> Callable[[], list[Any]]:
        """Start ``ops``; the returned function gives the results of ``execute``.

        A store behind a network round trip (Redis) sends the ops here and reads the
        answer when the function is called, so the caller can work meanwhile. Call it
        exactly once, also when the caller's own work fails (an unread answer holds a
        connection). This default simply executes the ops now.
        """
        results = self.execute(ops, now)
        return lambda: results

    def set_horizon(self, before: float) -> None:  # noqa: B027 - optional hook
        """Fields that expired before event time ``before`` may be dropped whenever the
        store touches them. Called every batch (``expire`` is the full, slower sweep)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (files, connections)."""


def apply_op(record: dict[str, list], op: Op) -> Any:
    """Apply one op to an entity record ``{field: [value, expire_at]}``; return its result.

    Shared by the memory and RocksDB stores so both give identical answers.
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
        if arg not in members:
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
    """State in a dict: the offline path, unit tests, and the worker's Redis fallback."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, list]] = {}

    def execute(self, ops: Sequence[Op], now: float = 0.0) -> list[Any]:
        records = self._records
        results = []
        for op in ops:
            record = records.get(op[ENTITY])
            if record is None:
                record = records[op[ENTITY]] = {}
            results.append(apply_op(record, op))
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
