"""Pieces of the Faust worker that run without a broker: the lag metric."""

from __future__ import annotations

from faust.types import TP

from stream.app import committed_lag, report_committed_lag
from stream.metrics import WorkerMetrics


class FakeConsumer:
    """What the lag report reads of a Faust consumer: assignment, high watermarks and the
    committed offsets (Faust's ``_committed_offset``, None where nothing was committed)."""

    def __init__(self, highs: dict[TP, int | None], committed: dict[TP, int | None]) -> None:
        self.highs = highs
        self._committed_offset = committed

    def assignment(self) -> set[TP]:
        return set(self.highs)

    def highwater(self, tp: TP) -> int | None:
        return self.highs[tp]


def test_lag_is_the_high_watermark_minus_the_committed_offset() -> None:
    assert committed_lag(100, 40) == 60
    assert committed_lag(100, 100) == 0
    assert committed_lag(50, None) == 50  # nothing committed yet: all of it
    assert committed_lag(None, 40) is None


def test_the_lag_gauge_follows_commits_not_decisions() -> None:
    """Partition 0 had everything decided, but its commits stopped at 1,322 (a batch
    never acknowledged): the gauge shows the stall."""
    stuck, fresh, other = TP("clicks", 0), TP("clicks", 1), TP("purchases", 0)
    consumer = FakeConsumer(
        {stuck: 5_510, fresh: 300, other: 9},
        {stuck: 1_322, fresh: None, other: 0},
    )
    metrics = WorkerMetrics()
    report_committed_lag(consumer, "clicks", metrics)

    def lag(partition: int) -> float | None:
        return metrics.registry.get_sample_value(
            "slidr_consumer_lag", {"partition": str(partition)}
        )

    assert lag(0) == 5_510 - 1_322
    assert lag(1) == 300
