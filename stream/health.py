"""The worker's health, as probes read it on the metrics port (SPEC §2):

- ``/healthz`` (liveness): 200 while the worker's event loop turns (a timer calls
  ``beat`` every second) and the worker has not stopped itself; 503 otherwise. A
  probe that restarts the process is the right answer to both.
- ``/readyz`` (readiness): 200 when the worker holds partitions of ``clicks``, none of
  them still being restored from its changelog, and a model is loaded; 503 otherwise.
  Both answers carry a JSON body saying why.

The worker reports facts (``beat``, ``assigned``, ``revoked``, ``stopped``); the HTTP
server thread reads them, so every read and write holds one lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson

# A loop silent this long is stuck, not busy: a micro-batch takes tens of milliseconds.
# Generous, because a partition's state restore on assignment may hold the loop for a
# while; a Kubernetes liveness probe adds its own failureThreshold x periodSeconds.
LOOP_STALL_S = 60.0

WsgiApp = Callable[[dict, Callable[..., Any]], Iterable[bytes]]


class WorkerHealth:
    """Liveness and readiness facts of one worker process.

    ``model_version`` returns the loaded model's version, or None while none is loaded.
    ``clock`` is monotonic seconds (injectable for tests); the loop counts as alive from
    construction until ``stall_after_s`` passes without a ``beat``.
    """

    def __init__(
        self,
        model_version: Callable[[], str | None],
        stall_after_s: float = LOOP_STALL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._model_version = model_version
        self._stall_after_s = stall_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_beat = clock()
        self._partitions: frozenset[int] = frozenset()
        self._restoring: frozenset[int] = frozenset()
        self._stopped: str | None = None

    def beat(self) -> None:
        """Called from the worker's event loop: it still turns."""
        now = self._clock()
        with self._lock:
            self._last_beat = now

    def assigned(self, partitions: Iterable[int]) -> None:
        """The worker's whole new assignment of ``clicks`` partitions (a rebalance ended)."""
        with self._lock:
            self._partitions = frozenset(partitions)

    def revoked(self, partitions: Iterable[int]) -> None:
        """Partitions of ``clicks`` given away (a rebalance began)."""
        with self._lock:
            self._partitions = self._partitions - frozenset(partitions)

    def restoring(self, partitions: Iterable[int]) -> None:
        """Partitions whose state is being restored: not decided until ``restored``."""
        with self._lock:
            self._restoring = self._restoring | frozenset(partitions)

    def restored(self, partitions: Iterable[int]) -> None:
        """The restore of ``partitions`` ended (done, failed or abandoned)."""
        with self._lock:
            self._restoring = self._restoring - frozenset(partitions)

    def stopped(self, reason: str) -> None:
        """The worker stopped deciding for good (it crashed or is shutting down)."""
        with self._lock:
            if self._stopped is None:
                self._stopped = reason

    def liveness(self) -> tuple[bool, dict]:
        """(alive, why): the body ``/healthz`` answers with."""
        now = self._clock()
        with self._lock:
            silent_s = round(max(0.0, now - self._last_beat), 3)
            stopped = self._stopped
        if stopped is not None:
            return False, {"status": "stopped", "reason": stopped}
        if silent_s > self._stall_after_s:
            return False, {
                "status": "stalled",
                "reason": f"event loop silent for {silent_s:.0f} s",
                "loop_silent_s": silent_s,
            }
        return True, {"status": "alive", "loop_silent_s": silent_s}

    def readiness(self) -> tuple[bool, dict]:
        """(ready, why): the body ``/readyz`` answers with."""
        version = self._model_version()
        with self._lock:
            partitions = sorted(self._partitions)
            restoring = sorted(self._restoring & self._partitions)
            stopped = self._stopped
        facts = {"partitions": partitions, "model_version": version}
        if stopped is not None:
            return False, {"status": "not ready", "reason": f"stopped: {stopped}", **facts}
        if version is None:
            return False, {"status": "not ready", "reason": "no model loaded", **facts}
        if not partitions:
            return False, {"status": "not ready", "reason": "no partitions assigned", **facts}
        if restoring:
            return False, {
                "status": "not ready",
                "reason": "restoring partitions " + ", ".join(map(str, restoring)),
                **facts,
            }
        return True, {"status": "ready", **facts}

    def wsgi_app(self, other: WsgiApp) -> WsgiApp:
        """A WSGI app answering ``/healthz`` and ``/readyz`` and passing every other path
        to ``other`` (the Prometheus app)."""
        probes = {"/healthz": self.liveness, "/readyz": self.readiness}

        def app(environ: dict, start_response: Callable[..., Any]) -> Iterator[bytes]:
            probe = probes.get(environ.get("PATH_INFO", ""))
            if probe is None:
                yield from other(environ, start_response)
                return
            ok, body = probe()
            payload = orjson.dumps(body)
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))],
            )
            yield payload

        return app
