"""How a worker process takes its place in the consumer group, and takes it back after a
crash (``SLIDR_GROUP_MEMBERSHIP``; README, Restarts).

Every worker process has an instance id, stable across its restarts and unique within
its group: ``SLIDR_INSTANCE_ID``, by default ``<hostname>-<slot>`` where the slot is the
process's place under ``slidr worker --processes N`` (0 for a single process).

After a kill -9 the group still holds the dead process's member until its session times
out; a plain restart (``dynamic``) joins beside it and waits for that timeout and then a
full rejoin (on the embedded broker 11 s from kill to assignment with a 6 s session).
Two remedies:

- ``fenced`` (the default): each process records the member id the coordinator gave it,
  under ``<home>/members/<group>/<instance id>``; on start it asks the coordinator to
  remove that member (a LeaveGroup on its behalf) before joining, so the group need not
  wait for the dead member's session. The other members rebalance once, as they would
  when the session ran out. Works on any broker that accepts LeaveGroup.
- ``static``: Kafka's static membership (KIP-345): the instance id is sent as
  ``group.instance.id``, and a member that comes back within its session gets its own
  partitions back without a rebalance of the others. The session timeout must then
  exceed the whole restart (process start, join and sync); Tansu 0.6 holds each join and
  each sync of a static member for 3 s or more, so there it is the slower choice.

Two live processes must never share an instance id: under ``fenced`` each start of one
would remove the other from the group (it rejoins, a rebalance); under ``static`` the
broker fences the older one. On one host that is checked: a worker holds a lock on its
instance's record for its whole life (``claim_instance``), and a second one with the same
id and home stops at start-up with an error naming ``SLIDR_INSTANCE_ID``. Across hosts
the ids differ by hostname unless set by hand.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO

import faust

from events.errors import SlidrError
from events.settings import Settings
from stream.faust_compat import group_member_id, leave_group

log = logging.getLogger("slidr.worker")


def instance_id(settings: Settings, slot: int = 0) -> str:
    """This process's instance id: ``SLIDR_INSTANCE_ID`` as given, else hostname-slot."""
    if settings.instance_id:
        return settings.instance_id
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return f"{host or 'localhost'}-{slot}"


class InstanceInUse(SlidrError, RuntimeError):
    """Another live worker on this host already runs under this instance id."""


def claim_instance(settings: Settings) -> IO[str] | None:
    """Lock this instance's record for the life of the process (the kernel drops the lock
    when the process dies, kill -9 included); None under ``dynamic``, which keeps no
    record. Raises ``InstanceInUse`` when a live process holds it."""
    if settings.group_membership == "dynamic":
        return None
    record = member_record(settings)
    record.parent.mkdir(parents=True, exist_ok=True)
    handle = open(record.with_name(record.name + ".lock"), "a")  # noqa: SIM115 (held)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise InstanceInUse(
            f"instance id {instance_id(settings)!r} of group {settings.group_id!r} is in use "
            f"by another live worker with SLIDR_HOME {settings.home}: give each worker its "
            "own SLIDR_INSTANCE_ID (or run them as one `slidr worker --processes N`)"
        ) from None
    return handle


def static_instance_id(settings: Settings) -> str | None:
    """The ``group.instance.id`` to send: the instance id under ``static``, else None."""
    return instance_id(settings) if settings.group_membership == "static" else None


def member_record(settings: Settings) -> Path:
    """Where the member id of this instance's current incarnation is kept."""
    return settings.home / "members" / settings.group_id / instance_id(settings)


def record_member_on_assignment(app: faust.App, settings: Settings) -> None:
    """Under ``fenced``, write the app's member id to ``member_record`` whenever the group
    assigns it partitions, so that the next incarnation can remove this one."""
    if settings.group_membership != "fenced":
        return
    path = member_record(settings)

    # mode's signal passes the sender first; faust sends the assigned partitions too.
    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def remember_member(app_, assigned, **kwargs) -> None:
        member_id = group_member_id(app)
        if member_id is not None:
            write_member(path, member_id)


def write_member(path: Path, member_id: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(member_id + "\n")
    os.replace(partial, path)  # a reader sees the old id or the new one, never half


def read_member(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


async def fence_previous_incarnation(app: faust.App, settings: Settings) -> str | None:
    """Under ``fenced``, remove the member this instance's previous incarnation left in
    the group; returns what the coordinator answered (None: nothing to remove). A
    failure is logged and ignored: the join then waits out the old session, as before."""
    if settings.group_membership != "fenced":
        return None
    path = member_record(settings)
    previous = read_member(path)
    if previous is None:
        return None
    try:
        answer = await leave_group(app, previous)
    except Exception as exc:  # the broker is down or refuses: joining will tell
        log.warning("could not remove the previous member %s: %r", previous, exc)
        return None
    path.unlink(missing_ok=True)  # removed, or already gone from the group
    if answer == "NoError":
        # A warning: it shows at every log level, and says this start followed a crash.
        log.warning("removed this instance's previous member %s: %s", previous, answer)
    else:  # it left the group when it stopped, or its session had run out
        log.info("this instance's previous member %s was gone: %s", previous, answer)
    return answer
