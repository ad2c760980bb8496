"""``slidr monitor``: live decisions against what the active version promised, and an
automatic rollback on a sharp deviation.

Two parts:

- ``DeviationDetector`` (pure, no Kafka, no clock): fed decisions and purchases, it keeps
  a sliding window of the watched version's decisions (the last ``window_decisions``,
  none older than ``window_seconds`` by ``decided_at``) and compares it with the
  version's promise (``Promise``: held-out IVR overall and per slice, and FPR, from the
  manifest's evaluation). It names the first deviation it sees:

  ``invalid_spike``  most of the newest decisions invalid, across slices (a broken
                     version invalidating everything; needs few decisions);
  ``ivr``            overall IVR above ``ivr_factor`` x promised (and promised + margin);
  ``slice_ivr``      one slice's IVR above ``slice_ivr_factor`` x its promise;
  ``fpr``            invalidated share of clicks whose purchase has arrived (purchases
                     naming their ``click_id``) above ``fpr_factor`` x promised FPR;
  ``vouched_fpr``    the same among clicks of high-RFM customers (decisions carry
                     ``customer_rfm``): known humans, known at decision time.

  Each needs a minimum number of decisions; decisions of other versions and replays are
  ignored, so a window never mixes versions. A promise is a day's average, and traffic
  is not: at night robots raise every version's IVR. So when the watch passes from one
  version to the next, the previous version's live window (if it did not deviate)
  measures how far the current traffic sits above its promise, and the new version's
  IVR limits scale by that *traffic factor* (overall and per slice, in [1,
  ``max_traffic_factor``]): a version is judged against what it should do on this
  traffic, not on an average day.
- ``Monitor``: a thin loop over ``decisions``, ``purchases`` and ``slidr.control``
  (assigned from their end, outside any consumer group, so it disturbs nobody). It
  watches the active version, switches when the control topic announces another, and on
  a deviation rolls back (``stream.control.rollback``) when ``RollbackPolicy`` allows it:
  the deviating version is still the active one, it was promoted (a version we rolled
  back *to* is never rolled back again, which would cascade through old versions) and,
  optionally, recently. Every deviation and rollback is a JSON line in
  ``REGISTRY/monitor.jsonl``; the registry's history keeps the rollback and its reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import orjson

from models.labels import RfmPolicy

log = logging.getLogger("slidr.monitor")

MONITOR_LOG = "monitor.jsonl"


@dataclass(frozen=True)
class MonitorConfig:
    """Window and limits of the detector. Rates are shares in [0, 1]; times in seconds."""

    window_decisions: int = 5_000  # the sliding window holds at most this many decisions
    window_seconds: float = 600.0  # ... and none decided longer ago than this
    min_decisions: int = 1_000  # ``ivr`` needs this many decisions in the window
    ivr_factor: float = 2.0  # ``ivr``: window IVR > max(factor x promised, promised + margin)
    ivr_margin: float = 0.05
    min_slice_decisions: int = 300  # ``slice_ivr`` needs this many of the slice
    slice_ivr_factor: float = 3.0
    slice_ivr_margin: float = 0.1
    spike_decisions: int = 200  # ``invalid_spike`` looks at the newest this many decisions
    spike_share: float = 0.9  # ... invalid share that is a spike, overall and in
    spike_min_slices: int = 2  # ... at least this many slices (a robot burst hits one)
    spike_min_slice_decisions: int = 20  # ... counting slices with this many decisions
    fpr_factor: float = (
        3.0  # ``fpr``/``vouched_fpr``: > max(factor x promised FPR, promised + margin)
    )
    fpr_margin: float = 0.05
    min_purchasing: int = 50  # ``fpr`` needs this many purchased clicks in its window
    purchasing_window: int = 1_000  # the newest purchased clicks judged
    min_vouched: int = 100  # ``vouched_fpr`` needs this many high-RFM clicks in the window
    high_rfm: float = RfmPolicy().high_score  # customer_rfm at or above: a known human
    remembered_decisions: int = 200_000  # decisions kept to match late purchases to
    max_traffic_factor: float = 3.0  # most the previous version's live/promised IVR loosens limits


@dataclass(frozen=True)
class Promise:
    """What a version's evaluation promised (manifest ``metrics.test``, held-out day)."""

    version: str
    ivr: float
    fpr: float | None
    slice_ivr: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: dict) -> Promise:
        test = manifest["metrics"]["test"]
        return cls(
            version=manifest["version"],
            ivr=float(test["overall"]["ivr"] or 0.0),
            fpr=test["overall"].get("fpr"),
            slice_ivr={s: float(f["ivr"] or 0.0) for s, f in test.get("slices", {}).items()},
        )


@dataclass(frozen=True)
class Deviation:
    """A sharp deviation of the watched version from its promise."""

    check: str  # invalid_spike, ivr, slice_ivr, fpr, vouched_fpr
    version: str
    value: float
    limit: float
    decisions: int  # decisions behind the value
    detail: str
    at: float  # decided_at of the decision (or purchase time) that tripped it

    def reason(self) -> str:
        return f"monitor: {self.check} on {self.version}: {self.detail}"


def _limit(promised: float, factor: float, margin: float) -> float:
    return max(factor * promised, promised + margin)


class _Rates:
    """Invalid counts of a bounded sequence, overall and per key, kept incrementally."""

    def __init__(self) -> None:
        self.items: deque[tuple[float, bool, str]] = deque()
        self.n = 0
        self.invalid = 0
        self.by_key: Counter = Counter()
        self.invalid_by_key: Counter = Counter()

    def push(self, at: float, invalid: bool, key: str) -> None:
        self.items.append((at, invalid, key))
        self.n += 1
        self.invalid += invalid
        self.by_key[key] += 1
        self.invalid_by_key[key] += invalid

    def pop(self) -> None:
        _, invalid, key = self.items.popleft()
        self.n -= 1
        self.invalid -= invalid
        self.by_key[key] -= 1
        self.invalid_by_key[key] -= invalid

    def evict(self, most: int, before: float | None = None) -> None:
        while self.n > most or (before is not None and self.n and self.items[0][0] < before):
            self.pop()

    def share(self, key: str | None = None) -> float:
        if key is None:
            return self.invalid / self.n if self.n else 0.0
        n = self.by_key[key]
        return self.invalid_by_key[key] / n if n else 0.0


class DeviationDetector:
    """Compares the watched version's live decisions with its promise (no I/O, no clock)."""

    def __init__(self, config: MonitorConfig = MonitorConfig()) -> None:
        self.config = config
        self.promise: Promise | None = None
        self.tripped: Deviation | None = None
        self.ignored = 0  # decisions of other versions, or replays
        self.traffic = 1.0  # live / promised IVR of the previous version (see module doc)
        self.slice_traffic: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self.window = _Rates()  # (decided_at, invalid, slice)
        self.newest = _Rates()  # the newest ``spike_decisions``
        self.vouched = _Rates()  # high-RFM customers' clicks, within the window's time
        self.purchased = _Rates()  # clicks whose purchase arrived
        self.remembered: OrderedDict[str, tuple[bool, str]] = OrderedDict()
        self.last_at = 0.0

    def watch(self, promise: Promise) -> None:
        """Start judging ``promise.version`` afresh (empty windows, nothing tripped); the
        window of the version watched so far, unless it deviated, sets the traffic factor."""
        c, before, w = self.config, self.promise, self.window
        self.traffic, self.slice_traffic = 1.0, {}
        if (
            before is not None
            and self.tripped is None
            and w.n >= c.min_decisions
            and before.ivr > 0
        ):

            def factor(live: float, promised: float) -> float:
                return min(max(live / promised, 1.0), c.max_traffic_factor)

            self.traffic = factor(w.share(), before.ivr)
            self.slice_traffic = {
                k: factor(w.share(k), before.slice_ivr[k])
                for k, n in w.by_key.items()
                if n >= c.min_slice_decisions and before.slice_ivr.get(k, 0) > 0
            }
        self.promise = promise
        self.tripped = None
        self._reset()

    @property
    def version(self) -> str | None:
        return self.promise.version if self.promise else None

    def observe(self, decision: dict) -> Deviation | None:
        """Fold one decision in; the deviation it reveals, once per watched version."""
        c = self.config
        if (
            self.promise is None
            or decision.get("model_version") != self.promise.version
            or decision.get("replay")
        ):
            self.ignored += 1
            return None
        at = float(decision.get("decided_at") or 0.0)
        self.last_at = max(self.last_at, at)
        invalid = decision.get("verdict") == "invalid"
        slice_ = str(decision.get("slice"))
        self.window.push(at, invalid, slice_)
        self.window.evict(c.window_decisions, self.last_at - c.window_seconds)
        self.newest.push(at, invalid, slice_)
        self.newest.evict(c.spike_decisions)
        rfm = decision.get("customer_rfm")
        if rfm is not None and rfm >= c.high_rfm:
            self.vouched.push(at, invalid, slice_)
        self.vouched.evict(c.window_decisions, self.last_at - c.window_seconds)
        click_id = decision.get("click_id")
        if click_id is not None:
            self.remembered[click_id] = (invalid, slice_)
            if len(self.remembered) > c.remembered_decisions:
                self.remembered.popitem(last=False)
        if self.tripped is not None:
            return None
        found = self._check_decisions(slice_, at)
        if found is not None:
            self.tripped = found
        return found

    def observe_purchase(self, purchase: dict) -> Deviation | None:
        """Fold one purchase in: the click it names, if decided by the watched version,
        joins the purchased window (purchases without ``click_id`` cannot be matched:
        decisions carry no user)."""
        c = self.config
        click_id = purchase.get("click_id")
        seen = self.remembered.pop(click_id, None) if click_id else None
        if self.promise is None or seen is None:
            return None
        invalid, slice_ = seen
        self.purchased.push(float(purchase.get("ts") or 0.0), invalid, slice_)
        self.purchased.evict(c.purchasing_window)
        if (
            self.tripped is not None
            or self.promise.fpr is None
            or self.purchased.n < c.min_purchasing
        ):
            return None
        limit = _limit(self.promise.fpr, c.fpr_factor, c.fpr_margin)
        value = self.purchased.share()
        if value > limit:
            self.tripped = Deviation(
                "fpr",
                self.promise.version,
                value,
                limit,
                self.purchased.n,
                f"{self.purchased.invalid} of the last {self.purchased.n} purchased clicks invalid "
                f"({value:.3f} > {limit:.3f}; promised FPR {self.promise.fpr:.3f})",
                self.last_at,
            )
            return self.tripped
        return None

    def _check_decisions(self, slice_: str, at: float) -> Deviation | None:
        c, p = self.config, self.promise
        assert p is not None
        w, newest = self.window, self.newest
        if newest.n >= c.spike_decisions and newest.share() >= c.spike_share:
            hit = [
                k
                for k, n in newest.by_key.items()
                if n >= c.spike_min_slice_decisions and newest.share(k) >= c.spike_share
            ]
            if len(hit) >= c.spike_min_slices:
                return Deviation(
                    "invalid_spike",
                    p.version,
                    newest.share(),
                    c.spike_share,
                    newest.n,
                    f"{newest.invalid} of the newest {newest.n} decisions invalid, in slices "
                    f"{', '.join(sorted(hit))} (promised IVR {p.ivr:.3f})",
                    at,
                )
        if w.n >= c.min_decisions:
            limit = _limit(p.ivr * self.traffic, c.ivr_factor, c.ivr_margin)
            if w.share() > limit:
                return Deviation(
                    "ivr",
                    p.version,
                    w.share(),
                    limit,
                    w.n,
                    f"IVR {w.share():.3f} over the last {w.n} decisions > {limit:.3f} "
                    f"(promised {p.ivr:.3f}"
                    f"{f', traffic x{self.traffic:.2f}' if self.traffic > 1 else ''})",
                    at,
                )
        n_slice = w.by_key[slice_]
        if n_slice >= c.min_slice_decisions and slice_ in p.slice_ivr:
            promised = p.slice_ivr[slice_]
            traffic = self.slice_traffic.get(slice_, self.traffic)
            limit = _limit(promised * traffic, c.slice_ivr_factor, c.slice_ivr_margin)
            value = w.share(slice_)
            if value > limit:
                return Deviation(
                    "slice_ivr",
                    p.version,
                    value,
                    limit,
                    n_slice,
                    f"slice {slice_} IVR {value:.3f} over its last {n_slice} decisions "
                    f"> {limit:.3f} (promised {promised:.3f}"
                    f"{f', traffic x{traffic:.2f}' if traffic > 1 else ''})",
                    at,
                )
        if self.vouched.n >= c.min_vouched and p.fpr is not None:
            limit = _limit(p.fpr, c.fpr_factor, c.fpr_margin)
            value = self.vouched.share()
            if value > limit:
                return Deviation(
                    "vouched_fpr",
                    p.version,
                    value,
                    limit,
                    self.vouched.n,
                    f"{self.vouched.invalid} of {self.vouched.n} clicks of high-RFM "
                    f"customers invalid ({value:.3f} > {limit:.3f}; promised FPR {p.fpr:.3f})",
                    at,
                )
        return None

    def stats(self) -> dict:
        """The window's figures (for status lines and the monitor log)."""
        p = self.promise
        return {
            "version": p.version if p else None,
            "decisions": self.window.n,
            "ivr": round(self.window.share(), 4),
            "promised_ivr": round(p.ivr, 4) if p else None,
            "traffic_factor": round(self.traffic, 3),
            "newest_invalid_share": round(self.newest.share(), 4),
            "purchased": self.purchased.n,
            "purchased_invalid_share": round(self.purchased.share(), 4),
            "vouched": self.vouched.n,
            "vouched_invalid_share": round(self.vouched.share(), 4),
            "slices": {
                k: [n, round(self.window.share(k), 4)]
                for k, n in sorted(self.window.by_key.items())
                if n
            },
            "ignored": self.ignored,
        }


# --------------------------------------------------------------------------------------
# Rollback policy and the Kafka loop
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Watched:
    """The version being judged, since when, and how it became active."""

    version: str
    since: float  # epoch seconds of its activation (control message or registry history)
    via: str  # "activate" (a promotion) or "rollback"


@dataclass(frozen=True)
class RollbackPolicy:
    enabled: bool = True  # False: deviations are logged, nothing is rolled back
    within_s: float = 0.0  # only versions activated at most this long before (0: any)

    def decide(
        self, deviation: Deviation, watched: Watched, active: str | None
    ) -> tuple[bool, str]:
        """Whether to roll back on ``deviation``, and why (not)."""
        if not self.enabled:
            return False, "rollback disabled (--no-rollback)"
        if active != deviation.version:
            return False, f"{deviation.version} is no longer active (active: {active})"
        if watched.via == "rollback":
            return False, f"{deviation.version} was rolled back to; not rolling back further"
        if self.within_s and deviation.at - watched.since > self.within_s:
            return False, f"{deviation.version} has been active for over {self.within_s:.0f} s"
        return True, "rolling back"


def _last_activation(registry, version: str) -> Watched:
    for event in reversed(registry.history()):
        if event.get("version") == version and event.get("event") in ("activate", "rollback"):
            return Watched(version, float(event.get("at", 0.0)), event["event"])
    return Watched(version, 0.0, "activate")


class Monitor:
    """Follows decisions, purchases and control messages; rolls back on a deviation."""

    def __init__(
        self,
        settings,
        config: MonitorConfig = MonitorConfig(),
        policy: RollbackPolicy = RollbackPolicy(),
        status_every_s: float = 10.0,
        out: Callable[[str], None] | None = None,
    ) -> None:
        from models.registry import ModelRegistry

        self.settings = settings
        self.registry = ModelRegistry(settings.registry)
        self.detector = DeviationDetector(config)
        self.policy = policy
        self.status_every_s = status_every_s
        self.out = out or (lambda line: print(line, flush=True))
        self.watched: Watched | None = None
        self.events: list[dict] = []  # deviations and rollbacks, as logged
        self.ready = threading.Event()  # set once assigned at the topics' ends
        self.stop_event = threading.Event()

    # -- what to watch ----------------------------------------------------------------

    def watch(self, watched: Watched) -> None:
        try:
            promise = Promise.from_manifest(self.registry.manifest(watched.version))
        except Exception as exc:  # an unknown version: judge nothing until the next switch
            self.out(f"monitor: cannot watch {watched.version}: {exc}")
            self.watched, self.detector.promise = None, None
            return
        self.watched = watched
        self.detector.watch(promise)
        fpr = f"{promise.fpr:.3f}" if promise.fpr is not None else "n/a"
        self.out(
            f"monitor: watching {watched.version} ({watched.via}); "
            f"promised IVR {promise.ivr:.3f}, FPR {fpr}"
        )

    def _record(self, event: dict) -> None:
        self.events.append(event)
        self.registry.root.mkdir(parents=True, exist_ok=True)
        with (self.registry.root / MONITOR_LOG).open("ab") as handle:
            handle.write(orjson.dumps(event, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    def handle(self, deviation: Deviation) -> dict:
        """Log a deviation and roll back when the policy allows; returns the logged event."""
        from stream.control import rollback

        watched = self.watched or Watched(deviation.version, 0.0, "activate")
        go, why = self.policy.decide(deviation, watched, self.registry.active_version())
        event = {
            "at": time.time(),
            "event": "deviation",
            **asdict(deviation),
            "reason": deviation.reason(),
            "window": self.detector.stats(),
        }
        self.out(f"monitor: DEVIATION {deviation.reason()}")
        if go:
            try:
                # Only from the version judged: a retrain that promoted meanwhile wins.
                message = rollback(
                    self.settings, reason=deviation.reason(), expected_active=deviation.version
                )
            except Exception as exc:  # e.g. no stable version to return to
                event.update(event="deviation", rollback_error=str(exc))
                self.out(f"monitor: cannot roll back: {exc}")
            else:
                event.update(
                    event="rollback",
                    rolled_back_to=message["model_version"],
                    rolled_back_at=message["at"],
                )
                self.out(f"monitor: ROLLED BACK {deviation.version} -> {message['model_version']}")
                self.watch(Watched(message["model_version"], message["at"], "rollback"))
        else:
            event["not_rolled_back"] = why
            self.out(f"monitor: not rolling back: {why}")
        self._record(event)
        return event

    # -- the loop -----------------------------------------------------------------------

    def run(self, duration_s: float = 0.0) -> list[dict]:
        """Follow the topics until ``stop_event`` (or ``duration_s`` seconds; 0: forever)."""
        from stream.kafka import CONTROL, DECISIONS, PURCHASES, ensure_topics
        from stream.topics import END, TopicTail

        active = self.registry.active_version()
        if active:
            self.watch(_last_activation(self.registry, active))
        s = self.settings
        kinds = {DECISIONS: "decision", PURCHASES: "purchase", CONTROL: "control"}
        ensure_topics(s, names=tuple(kinds))
        kind_of = {s.topic(name): kind for name, kind in kinds.items()}
        tail = TopicTail(s, tuple(kinds), start=END, label="monitor", batch=500, wait_s=0.1)
        self.ready.set()
        started = last_status = time.monotonic()
        with tail:
            for messages in tail.batches(stop=self.stop_event):
                for msg in messages:
                    value = msg.value()
                    if value is not None:
                        self._message(kind_of.get(msg.topic()), value)
                if self.status_every_s and time.monotonic() - last_status >= self.status_every_s:
                    last_status = time.monotonic()
                    self.out("monitor: " + orjson.dumps(self.detector.stats()).decode())
                if duration_s and time.monotonic() - started > duration_s:
                    break
        return self.events

    def _message(self, kind: str | None, raw: bytes) -> None:
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return  # malformed records are the worker's dead-letter business
        if not isinstance(event, dict):
            return
        if kind == "control":
            version = event.get("model_version")
            if version and (self.watched is None or version != self.watched.version):
                self.watch(
                    Watched(
                        version,
                        float(event.get("at") or time.time()),
                        event.get("action", "activate"),
                    )
                )
            return
        found = (
            self.detector.observe(event)
            if kind == "decision"
            else self.detector.observe_purchase(event)
        )
        if found is not None:
            self.handle(found)

    def stop(self) -> None:
        self.stop_event.set()
