"""Time ``parse_click`` against ``decode_click`` (msgspec) on simulated clicks.

    python -m tests.events.bench_click_decoder [--clicks-per-day 20000] [--rounds 5]

The batch is one simulated day of clicks as ``slidr produce`` writes them, with 1% of
them spoiled in the ways the dead-letter tests use (bad JSON, a missing or wrongly typed
field, a bad time, a control character, an unknown field). Rounds alternate the two
parsers; each figure is the median over rounds of µs per message. Both must reach the
same verdict on every message, or the run fails.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from data.dataset import load_dataset
from data.simulator import simulate
from events.schemas import InvalidEvent, decode_click, parse_click

SPOILERS: tuple[Callable[[dict], bytes], ...] = (
    lambda c: orjson.dumps(c)[:-2],  # cut short: not JSON
    lambda c: orjson.dumps({k: v for k, v in c.items() if k != "ip"}),
    lambda c: orjson.dumps({**c, "user_id": 7}),
    lambda c: orjson.dumps({**c, "ts": "yesterday"}),
    lambda c: orjson.dumps({**c, "ts": -1}),
    lambda c: orjson.dumps({**c, "session_id": "s\x1fx"}),
    lambda c: orjson.dumps({**c, "logged_in": "yes"}),
    lambda c: orjson.dumps({**c, "campaign": "spring"}),  # valid, through parse_click
)


def messages(clicks_per_day: int, spoiled: float = 0.01, seed: int = 7) -> list[bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        simulate(Path(tmp), days=1, clicks_per_day=clicks_per_day, seed=seed)
        clicks = load_dataset(tmp).clicks
    rng = random.Random(seed)
    out = []
    for i in range(len(clicks)):
        row = clicks.row(i)
        spoil = rng.random() < spoiled
        out.append(rng.choice(SPOILERS)(row) if spoil else orjson.dumps(row))
    return out


def verdict(parse: Callable[[bytes], dict], raw: bytes) -> object:
    try:
        return parse(raw)
    except InvalidEvent as exc:
        return str(exc)


def time_per_message(parse: Callable[[bytes], dict], batch: list[bytes]) -> float:
    started = time.perf_counter()
    for raw in batch:
        with contextlib.suppress(InvalidEvent):
            parse(raw)
    return (time.perf_counter() - started) / len(batch) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks-per-day", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    batch = messages(args.clicks_per_day)
    differ = [raw for raw in batch if verdict(parse_click, raw) != verdict(decode_click, raw)]
    assert not differ, f"{len(differ)} messages get different verdicts, e.g. {differ[0][:200]!r}"
    rejected = sum(isinstance(verdict(parse_click, raw), str) for raw in batch)
    figures: dict[str, list[float]] = {"parse_click": [], "decode_click": []}
    for _ in range(args.rounds):
        for name, parse in (("parse_click", parse_click), ("decode_click", decode_click)):
            figures[name].append(time_per_message(parse, batch))
    print(f"{len(batch):,} messages, {rejected} rejected; same verdict on every one")
    for name, runs in figures.items():
        print(
            f"{name:>12}: median {statistics.median(runs):.2f} µs/message "
            f"(runs: {', '.join(f'{r:.2f}' for r in runs)})"
        )


if __name__ == "__main__":
    main()
