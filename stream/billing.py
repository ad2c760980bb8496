"""An example billing consumer: the latest decision per click, totals per advertiser.

Billing reads ``decisions`` and keeps, per ``click_id``, the decision with the latest
``decided_at`` (SPEC §1): a replay published later supersedes what the live worker said.
Advertisers come from the clicks themselves (``--data`` maps click ids to advertisers);
without it, totals are per slice.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from events.settings import Settings
from stream.kafka import DECISIONS
from stream.topics import BEGINNING, TopicTail


@dataclass
class BillingLedger:
    """Latest decision per click, and what it means for each advertiser's bill."""

    advertiser_of: dict[str, str] = field(default_factory=dict)
    latest: dict[str, tuple[float, str, bool]] = field(
        default_factory=dict
    )  # id -> (decided_at, verdict, replay)
    messages: int = 0
    superseded: int = 0

    def apply(self, decision: dict) -> None:
        self.messages += 1
        click_id = decision["click_id"]
        current = self.latest.get(click_id)
        entry = (float(decision["decided_at"]), decision["verdict"], bool(decision.get("replay")))
        if current is None or entry[0] >= current[0]:
            if current is not None and current[1] != entry[1]:
                self.superseded += 1
            self.latest[click_id] = entry

    def totals(self) -> dict[str, dict[str, int]]:
        """Per advertiser (or "unknown"): billable and invalid clicks."""
        out: dict[str, Counter] = {}
        for click_id, (_, verdict, _) in self.latest.items():
            who = self.advertiser_of.get(click_id, "unknown")
            out.setdefault(who, Counter())["billable" if verdict == "valid" else "invalid"] += 1
        return {k: dict(v) for k, v in out.items()}

    def summary(self) -> dict[str, int]:
        verdicts = Counter(v for _, v, _ in self.latest.values())
        return {
            "clicks": len(self.latest),
            "billable": verdicts.get("valid", 0),
            "invalid": verdicts.get("invalid", 0),
            "replayed": sum(1 for _, _, r in self.latest.values() if r),
            "decision_messages": self.messages,
            "verdicts_changed_by_later_decisions": self.superseded,
        }

    def render(self, top: int = 15) -> str:
        totals = sorted(self.totals().items(), key=lambda kv: -sum(kv[1].values()))
        lines = [f"{'advertiser':14} {'billable':>9} {'invalid':>9} {'invalid %':>9}"]
        for name, t in totals[:top]:
            n = t.get("billable", 0) + t.get("invalid", 0)
            lines.append(
                f"{name:14} {t.get('billable', 0):9,} {t.get('invalid', 0):9,} "
                f"{100 * t.get('invalid', 0) / n:8.1f}%"
            )
        if len(totals) > top:
            lines.append(f"... {len(totals) - top} more advertisers")
        s = self.summary()
        lines.append(
            f"total: {s['clicks']:,} clicks, {s['billable']:,} billable, {s['invalid']:,} invalid "
            f"({s['replayed']:,} by replay; {s['decision_messages']:,} decision messages)"
        )
        return "\n".join(lines)


def advertisers_from(directory: Path) -> dict[str, str]:
    from data.dataset import load_dataset

    clicks = load_dataset(directory).clicks
    adv = clicks.optional["advertiser_id"]
    return {c: a for c, a in zip(clicks.click_id, adv, strict=True) if a is not None}


def read_decisions(
    settings: Settings,
    ledger: BillingLedger,
    idle_s: float = 5.0,
    follow: bool = False,
    on_tick: Callable[[BillingLedger], None] | None = None,
    tick_s: float = 5.0,
) -> BillingLedger:
    """Read ``decisions`` from the beginning into ``ledger``; stop after ``idle_s`` of
    silence, or never with ``follow``."""
    last_tick = time.monotonic()
    with TopicTail(settings, [DECISIONS], start=BEGINNING, label="billing") as tail:
        for messages in tail.batches(idle_s=None if follow else idle_s):
            for msg in messages:
                ledger.apply(orjson.loads(msg.value() or b""))
            if on_tick is not None and time.monotonic() - last_tick >= tick_s:
                on_tick(ledger)
                last_tick = time.monotonic()
    return ledger


def run_billing(
    settings: Settings,
    data: Path | None,
    idle_s: float,
    follow: bool,
    on_tick: Callable[[BillingLedger], None] | None = None,
) -> BillingLedger:
    """The ledger of every decision on the topic; with ``follow``, ``on_tick`` sees it as
    it grows (the command line prints it)."""
    ledger = BillingLedger(advertiser_of=advertisers_from(data) if data else {})
    return read_decisions(
        settings, ledger, idle_s=idle_s, follow=follow, on_tick=on_tick if follow else None
    )
