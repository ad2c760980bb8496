"""``slidr monitor``: live decisions against what the active version promised, and an
automatic rollback on a confirmed deviation, whichever way the invalid rate moves.

Two parts:

- ``DeviationDetector`` (pure, no Kafka, no clock): fed decisions and purchases, it keeps
  a sliding window of the watched version's decisions (the last ``window_decisions``,
  none older than ``window_seconds`` by ``decided_at``) and compares it with the
  version's promise (``Promise``: held-out IVR overall and per slice, and FPR, from the
  manifest's evaluation). Its checks:

  ``invalid_spike``       most of the newest decisions invalid, in at least
                          ``spike_min_slices`` slices (a broken version invalidating
                          everything; needs few decisions; a robot burst hits one slice);
  ``ivr``                 overall IVR above ``ivr_factor`` x promised (and promised +
                          margin), and still above it without the one slice with the most
                          invalid verdicts beyond its promise (the other slices judged
                          against their own promises): an excess that one slice explains
                          is ``slice_ivr``'s business, with its wider limit;
  ``slice_ivr``           one slice's IVR above ``slice_ivr_factor`` x its promise;
  ``ivr_collapse``        overall IVR below min(promised / ``collapse_factor``, promised
                          - ``collapse_margin``): a version passing robots as valid (one
                          that passes every click shows IVR 0). A promise at or under
                          margin x factor / (factor - 1) is never judged this way;
  ``slice_ivr_collapse``  the same for one slice with ``min_slice_decisions``;
  ``fpr``                 invalidated share of clicks whose purchase has arrived
                          (purchases naming their ``click_id``) above ``fpr_factor`` x
                          promised FPR;
  ``vouched_fpr``         the same among clicks of high-RFM customers (decisions carry
                          ``customer_rfm``): known humans, known at decision time.

  Each needs a minimum number of decisions; decisions of other versions and replays are
  ignored, so a window never mixes versions. A promise is a day's average, and traffic
  is not: at night robots raise every version's IVR, and in quiet hours lower it. So
  when the watch passes from one version to the next, the previous version's live
  window (if it did not deviate) measures how far the current traffic sits from its
  promise, and the new version's limits scale by that *traffic factor* (overall and per
  slice): the spike limits by its part above 1 (up to ``max_traffic_factor``), the
  collapse limits by its part below 1 (down to 1 / ``max_traffic_factor``). A version is
  judged against what it should do on this traffic, not on an average day.

  Confirmation. Real robots come in bursts (one identity firing hundreds of clicks in a
  few minutes) that can push a healthy version's window over a limit. So a deviation
  on decisions is first only *suspected*; from then on, the decisions that follow are
  cut into consecutive confirmation windows, each spanning at least ``confirm_seconds``
  of ``decided_at`` and holding at least ``confirm_min_decisions`` decisions of the
  check's scope (the slice, for a slice check; ``spike_decisions`` for the spike). Each
  window is judged on its own decisions alone, by the same check. The deviation is
  confirmed, and reported, when ``confirm_windows`` windows in a row deviate; the first
  window that does not clears it (the check may suspect it again later). So a burst that
  stops less than (``confirm_windows`` - 1) x ``confirm_seconds`` after it was first
  seen never causes a rollback, and a deviation that lasts is confirmed about
  ``confirm_windows`` x ``confirm_seconds`` after it was first seen (defaults: 3 x
  60 s: a 2-minute burst does not roll back; a broken version is rolled back about 3
  minutes after it shows, and ``slidr replay`` corrects its verdicts).
  ``confirm_windows`` 0 reports a deviation as soon as it is seen. ``fpr`` is not
  confirmed this way: a purchase is evidence of a human that no robot burst can fake.
- ``Monitor``: a thin loop over ``decisions``, ``purchases`` and ``slidr.control``
  (assigned from their end, outside any consumer group, so it disturbs nobody). It
  watches the active version, switches when the control topic announces another, and on
  a confirmed deviation rolls back (``stream.control.rollback``) when ``RollbackPolicy``
  allows it: the deviating version is still the active one, it was promoted (a version
  we rolled back *to* is never rolled back again, which would cascade through old
  versions) and, optionally, recently. The rollback is compare-and-set on the active
  record the policy read (its version and generation), so a retrain that promotes
  between the check and the rollback, or any switch away and back, wins and nothing is
  rolled back. Every suspected and cleared deviation is a status line; every confirmed
  deviation and rollback is a JSON line in ``REGISTRY/monitor.jsonl``; the registry's
  history keeps the rollback and its reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

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
    # ``ivr_collapse``: window IVR < min(promised / factor, promised - margin); a promise
    # at or under margin x factor / (factor - 1) (here 0.067) is never judged: too few
    # invalid verdicts expected to tell a collapse from sampling noise.
    collapse_factor: float = 4.0
    collapse_margin: float = 0.05
    slice_collapse_factor: float = 4.0  # ``slice_ivr_collapse``, the same per slice
    slice_collapse_margin: float = 0.05
    # A deviation on decisions rolls back only once it holds in this many consecutive
    # confirmation windows after it was first seen (0: at once) ...
    confirm_windows: int = 3
    confirm_seconds: float = 60.0  # ... each spanning at least this long (decided_at)
    confirm_min_decisions: int = 100  # ... and holding this many decisions of its scope


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

    check: str  # invalid_spike, ivr, ivr_collapse, slice_ivr, slice_ivr_collapse, fpr, vouched_fpr
    version: str
    value: float
    limit: float
    decisions: int  # decisions behind the value
    detail: str
    at: float  # decided_at of the decision (or purchase time) that tripped it
    first_seen: float | None = None  # decided_at when first seen, if confirmed over windows

    def reason(self) -> str:
        return f"monitor: {self.check} on {self.version}: {self.detail}"


def _limit(promised: float, factor: float, margin: float) -> float:
    return max(factor * promised, promised + margin)


def _collapse_limit(promised: float, factor: float, margin: float) -> float:
    """Below this a rate has collapsed; 0 or less: a promise too small to judge."""
    return min(promised / factor, promised - margin)


# The checks on decisions; ``fpr`` (on purchases) is the sixth.
SPIKE, IVR, IVR_COLLAPSE = "invalid_spike", "ivr", "ivr_collapse"
SLICE_IVR, SLICE_COLLAPSE, VOUCHED = "slice_ivr", "slice_ivr_collapse", "vouched_fpr"
_SLICE_CHECKS = (SLICE_IVR, SLICE_COLLAPSE)


class _Tally:
    """Decisions and invalid verdicts, overall and per key (a slice)."""

    def __init__(self) -> None:
        self.n = 0
        self.invalid = 0
        self.by_key: Counter = Counter()
        self.invalid_by_key: Counter = Counter()

    def add(self, invalid: bool, key: str, sign: int = 1) -> None:
        self.n += sign
        self.invalid += sign * invalid
        self.by_key[key] += sign
        self.invalid_by_key[key] += sign * invalid

    def share(self, key: str | None = None) -> float:
        if key is None:
            return self.invalid / self.n if self.n else 0.0
        n = self.by_key[key]
        return self.invalid_by_key[key] / n if n else 0.0


class _Rates(_Tally):
    """A tally of a bounded sequence, kept incrementally as items leave it."""

    def __init__(self) -> None:
        super().__init__()
        self.items: deque[tuple[float, bool, str]] = deque()

    def push(self, at: float, invalid: bool, key: str) -> None:
        self.items.append((at, invalid, key))
        self.add(invalid, key)

    def pop(self) -> None:
        _, invalid, key = self.items.popleft()
        self.add(invalid, key, -1)

    def evict(self, most: int, before: float | None = None) -> None:
        while self.n > most or (before is not None and self.n and self.items[0][0] < before):
            self.pop()


@dataclass
class _Pending:
    """A deviation seen, not yet confirmed: the window being filled, windows passed."""

    check: str
    key: str | None  # the slice of a slice check
    first_seen: float
    window_start: float
    tally: _Tally = field(default_factory=_Tally)
    windows: int = 0

    @property
    def name(self) -> str:
        return f"{self.check}[{self.key}]" if self.key else self.check


class DeviationDetector:
    """Compares the watched version's live decisions with its promise (no I/O, no clock).

    ``notes``, when given, receives one line whenever a deviation is first seen and when
    its confirmation fails (the module doc explains the confirmation).
    """

    def __init__(
        self,
        config: MonitorConfig = MonitorConfig(),
        notes: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.notes = notes
        self.promise: Promise | None = None
        self.tripped: Deviation | None = None
        self.ignored = 0  # decisions of other versions, or replays
        # live / promised IVR of the previous version (see module doc): >= 1 loosens the
        # spike limits, <= 1 the collapse limits.
        self.traffic = 1.0
        self.slice_traffic: dict[str, float] = {}
        self.quiet = 1.0
        self.slice_quiet: dict[str, float] = {}
        self._reset()

    def _reset(self) -> None:
        self.window = _Rates()  # (decided_at, invalid, slice)
        self.newest = _Rates()  # the newest ``spike_decisions``
        self.vouched = _Rates()  # high-RFM customers' clicks, within the window's time
        self.purchased = _Rates()  # clicks whose purchase arrived
        self.remembered: OrderedDict[str, tuple[bool, str]] = OrderedDict()
        self.pending: dict[tuple[str, str | None], _Pending] = {}
        self.cleared = 0  # deviations seen whose confirmation failed
        self.last_at = 0.0

    def watch(self, promise: Promise) -> None:
        """Start judging ``promise.version`` afresh (empty windows, nothing tripped); the
        window of the version watched so far, unless it deviated, sets the traffic factor."""
        c, before, w = self.config, self.promise, self.window
        self.traffic, self.slice_traffic = 1.0, {}
        self.quiet, self.slice_quiet = 1.0, {}
        if (
            before is not None
            and self.tripped is None
            and w.n >= c.min_decisions
            and before.ivr > 0
        ):

            def busy(live: float, promised: float) -> float:
                return min(max(live / promised, 1.0), c.max_traffic_factor)

            def quiet(live: float, promised: float) -> float:
                return max(min(live / promised, 1.0), 1.0 / c.max_traffic_factor)

            judged = {
                k: before.slice_ivr[k]
                for k, n in w.by_key.items()
                if n >= c.min_slice_decisions and before.slice_ivr.get(k, 0) > 0
            }
            self.traffic = busy(w.share(), before.ivr)
            self.slice_traffic = {k: busy(w.share(k), p) for k, p in judged.items()}
            self.quiet = quiet(w.share(), before.ivr)
            self.slice_quiet = {k: quiet(w.share(k), p) for k, p in judged.items()}
        self.promise = promise
        self.tripped = None
        self._reset()

    @property
    def version(self) -> str | None:
        return self.promise.version if self.promise else None

    def observe(self, decision: dict) -> Deviation | None:
        """Fold one decision in; the confirmed deviation it reveals, once per watched
        version."""
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
        vouched = rfm is not None and rfm >= c.high_rfm
        if vouched:
            self.vouched.push(at, invalid, slice_)
        self.vouched.evict(c.window_decisions, self.last_at - c.window_seconds)
        click_id = decision.get("click_id")
        if click_id is not None:
            self.remembered[click_id] = (invalid, slice_)
            if len(self.remembered) > c.remembered_decisions:
                self.remembered.popitem(last=False)
        if self.tripped is not None:
            return None
        found = self._confirm(invalid, slice_, vouched, at)
        if found is None:
            found = self._suspect(slice_, at)
        if found is not None:
            self.tripped = found
        return found

    def _note(self, line: str) -> None:
        if self.notes is not None:
            self.notes(line)

    def _suspect(self, slice_: str, at: float) -> Deviation | None:
        """Run each check on the sliding windows; a deviation found is returned at once
        when ``confirm_windows`` is 0, otherwise it becomes pending."""
        c, p = self.config, self.promise
        assert p is not None
        w = self.window
        candidates: list[tuple[str, str | None, _Tally, bool]] = [
            (SPIKE, None, self.newest, self.newest.n >= c.spike_decisions),
            (IVR, None, w, w.n >= c.min_decisions),
            (IVR_COLLAPSE, None, w, w.n >= c.min_decisions),
            (SLICE_IVR, slice_, w, w.by_key[slice_] >= c.min_slice_decisions),
            (SLICE_COLLAPSE, slice_, w, w.by_key[slice_] >= c.min_slice_decisions),
            (VOUCHED, None, self.vouched, self.vouched.n >= c.min_vouched),
        ]
        for check, key, tally, enough in candidates:
            if not enough or (check, key) in self.pending:
                continue
            found = self._judge(check, key, tally, at)
            if found is None:
                continue
            if c.confirm_windows <= 0:
                return found
            pending = _Pending(check, key, first_seen=at, window_start=at)
            self.pending[(check, key)] = pending
            self._note(
                f"suspected {pending.name} on {p.version}: {found.detail}; rolled back only if "
                f"it holds in {c.confirm_windows} windows of >= {c.confirm_seconds:g} s"
            )
        return None

    def _confirm(self, invalid: bool, slice_: str, vouched: bool, at: float) -> Deviation | None:
        """Fold the decision into each pending deviation's window; judge windows that
        closed. A window that does not deviate clears its deviation."""
        c = self.config
        for name, pending in list(self.pending.items()):
            if pending.check == VOUCHED and not vouched:
                continue
            pending.tally.add(invalid, slice_)
            if at - pending.window_start < c.confirm_seconds:
                continue
            needed = c.confirm_min_decisions
            if pending.check == SPIKE:
                needed = max(needed, c.spike_decisions)
            n = pending.tally.by_key[pending.key] if pending.key else pending.tally.n
            if n < needed:
                continue  # a quiet window waits for enough decisions
            found = self._judge(pending.check, pending.key, pending.tally, at)
            if found is None:
                del self.pending[name]
                self.cleared += 1
                self._note(
                    f"cleared {pending.name}: window {pending.windows + 1} of "
                    f"{c.confirm_windows} ({n} decisions) no longer deviates"
                )
                continue
            pending.windows += 1
            if pending.windows >= c.confirm_windows:
                return replace(
                    found,
                    detail=f"{found.detail}; confirmed over {pending.windows} windows of "
                    f">= {c.confirm_seconds:g} s since {pending.first_seen:.1f}",
                    first_seen=pending.first_seen,
                )
            pending.window_start, pending.tally = at, _Tally()
        return None

    def _judge(self, check: str, key: str | None, t: _Tally, at: float) -> Deviation | None:
        """Whether the decisions tallied in ``t`` deviate by ``check`` (``key``: the
        slice of a slice check); the caller has checked there are enough."""
        c, p = self.config, self.promise
        assert p is not None
        if check == SPIKE:
            if t.share() < c.spike_share:
                return None
            hit = [
                k
                for k, n in t.by_key.items()
                if n >= c.spike_min_slice_decisions and t.share(k) >= c.spike_share
            ]
            if len(hit) < c.spike_min_slices:
                return None  # a robot burst hits one slice
            return Deviation(
                SPIKE,
                p.version,
                t.share(),
                c.spike_share,
                t.n,
                f"{t.invalid} of the newest {t.n} decisions invalid, in slices "
                f"{', '.join(sorted(hit))} (promised IVR {p.ivr:.3f})",
                at,
            )
        traffic_note = f", traffic x{self.traffic:.2f}" if self.traffic > 1 else ""
        if check == IVR:
            limit = _limit(p.ivr * self.traffic, c.ivr_factor, c.ivr_margin)
            value = t.share()
            if value <= limit:
                return None
            others = self._without_the_worst_slice(t)
            if others is None:
                return None  # one slice explains it: the slice check's business
            return Deviation(
                IVR,
                p.version,
                value,
                limit,
                t.n,
                f"IVR {value:.3f} over the last {t.n} decisions > {limit:.3f} "
                f"(promised {p.ivr:.3f}{traffic_note}); {others}",
                at,
            )
        if check == IVR_COLLAPSE:
            quiet_note = f", traffic x{self.quiet:.2f}" if self.quiet < 1 else ""
            limit = _collapse_limit(p.ivr * self.quiet, c.collapse_factor, c.collapse_margin)
            value = t.share()
            if value >= limit:
                return None
            return Deviation(
                IVR_COLLAPSE,
                p.version,
                value,
                limit,
                t.n,
                f"IVR {value:.3f} over the last {t.n} decisions < {limit:.3f} "
                f"(promised {p.ivr:.3f}{quiet_note})",
                at,
            )
        if check in _SLICE_CHECKS:
            assert key is not None
            if key not in p.slice_ivr:
                return None
            promised, n, value = p.slice_ivr[key], t.by_key[key], t.share(key)
            if check == SLICE_IVR:
                traffic = self.slice_traffic.get(key, self.traffic)
                limit = _limit(promised * traffic, c.slice_ivr_factor, c.slice_ivr_margin)
                if value <= limit:
                    return None
                relation, scaled = ">", f", traffic x{traffic:.2f}" if traffic > 1 else ""
            else:
                quiet = self.slice_quiet.get(key, self.quiet)
                limit = _collapse_limit(
                    promised * quiet, c.slice_collapse_factor, c.slice_collapse_margin
                )
                if value >= limit:
                    return None
                relation, scaled = "<", f", traffic x{quiet:.2f}" if quiet < 1 else ""
            return Deviation(
                check,
                p.version,
                value,
                limit,
                n,
                f"slice {key} IVR {value:.3f} over its last {n} decisions "
                f"{relation} {limit:.3f} (promised {promised:.3f}{scaled})",
                at,
            )
        if check == VOUCHED:
            if p.fpr is None:
                return None
            limit = _limit(p.fpr, c.fpr_factor, c.fpr_margin)
            value = t.share()
            if value <= limit:
                return None
            return Deviation(
                VOUCHED,
                p.version,
                value,
                limit,
                t.n,
                f"{t.invalid} of {t.n} clicks of high-RFM "
                f"customers invalid ({value:.3f} > {limit:.3f}; promised FPR {p.fpr:.3f})",
                at,
            )
        raise ValueError(f"unknown check {check!r}")

    def _without_the_worst_slice(self, t: _Tally) -> str | None:
        """Whether an overall IVR deviation holds without the slice with the most invalid
        verdicts beyond its promise: the other slices' IVR against their own promises
        (times the traffic factor). None when that one slice explains the deviation."""
        c, p = self.config, self.promise
        assert p is not None
        expected = {
            k: n * p.slice_ivr.get(k, p.ivr) * self.slice_traffic.get(k, self.traffic)
            for k, n in t.by_key.items()
            if n > 0
        }
        if not expected:
            return None
        worst = max(expected, key=lambda k: t.invalid_by_key[k] - expected[k])
        n = t.n - t.by_key[worst]
        if n <= 0:
            return None
        promised = (sum(expected.values()) - expected[worst]) / n
        value = (t.invalid - t.invalid_by_key[worst]) / n
        limit = _limit(promised, c.ivr_factor, c.ivr_margin)
        if value <= limit:
            return None
        return f"without slice {worst}: {value:.3f} > {limit:.3f} (promised {promised:.3f})"

    def observe_purchase(self, purchase: dict) -> Deviation | None:
        """Fold one purchase in: the click it names, if decided by the watched version,
        joins the purchased window (purchases without ``click_id`` cannot be matched:
        decisions carry no user). Not confirmed across windows: a purchase is evidence
        of a human that a robot burst cannot fake."""
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

    def stats(self) -> dict:
        """The window's figures (for status lines and the monitor log)."""
        p = self.promise
        return {
            "version": p.version if p else None,
            "decisions": self.window.n,
            "ivr": round(self.window.share(), 4),
            "promised_ivr": round(p.ivr, 4) if p else None,
            "traffic_factor": round(self.traffic, 3),
            "quiet_factor": round(self.quiet, 3),
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
            "pending": {
                p.name: {"first_seen": p.first_seen, "windows": p.windows}
                for p in self.pending.values()
            },
            "cleared": self.cleared,
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
        self.out = out or (lambda line: print(line, flush=True))
        self.detector = DeviationDetector(config, notes=lambda line: self.out(f"monitor: {line}"))
        self.policy = policy
        self.status_every_s = status_every_s
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
        record = self.registry.active_record()
        go, why = self.policy.decide(deviation, watched, record.version)
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
                # Only from the record the policy judged: a retrain that promoted
                # meanwhile wins, and so does any switch away and back (the generation).
                message = rollback(
                    self.settings,
                    reason=deviation.reason(),
                    expected_active=deviation.version,
                    expected_generation=record.generation,
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
