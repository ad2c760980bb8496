"""ClickFeaturizer's use of its stores, beyond the numbers (those are in test_parity)."""

from __future__ import annotations

import pytest

from features.definitions import ClickFeaturizer, combo_entity, signed_in_counterpart, slice_of
from features.store import MemoryStore
from features.windows import COMBOS

CLICK = {"click_id": "c1", "ts": 1_762_041_600.0, "user_id": "u1", "ip": "10.0.0.1"}


class FailingUserState(MemoryStore):
    def execute_rows(self, plan, rows, now=0.0):
        raise RuntimeError("disk error")


class WatchedSharedState(MemoryStore):
    """Records whether the answer of each submitted batch was read."""

    def __init__(self) -> None:
        super().__init__()
        self.read = []

    def submit_plans(self, jobs, now=0.0):
        pending = super().submit_plans(jobs, now)
        self.read.append(False)

        def result():
            self.read[-1] = True
            return pending()

        return result


def test_the_shared_answer_is_read_even_when_the_user_state_fails() -> None:
    shared = WatchedSharedState()
    featurizer = ClickFeaturizer(FailingUserState(), shared)
    with pytest.raises(RuntimeError, match="disk error"):
        featurizer.featurize([CLICK])
    assert shared.read == [True]  # an unread Redis answer would keep its connection


def test_the_shared_answer_is_read_once_per_batch() -> None:
    shared = WatchedSharedState()
    features = ClickFeaturizer(MemoryStore(), shared).featurize(
        [CLICK, {**CLICK, "click_id": "c2"}]
    )
    assert shared.read == [True] and features.matrix.shape[0] == 2


def test_ip_and_combination_state_go_in_one_shared_call() -> None:
    jobs_seen = []

    class Recording(MemoryStore):
        def submit_plans(self, jobs, now=0.0):
            jobs_seen.append([(plan, list(rows)) for plan, rows in jobs])
            return super().submit_plans(jobs, now)

    clicks = [CLICK, {**CLICK, "click_id": "c2", "context": {"app": "7"}}]
    ClickFeaturizer(MemoryStore(), Recording()).featurize(clicks)
    (jobs,) = jobs_seen  # one call for the batch
    assert [len(rows) for _, rows in jobs] == [2] * (1 + len(COMBOS))  # IP, then each combination
    assert jobs[1][1][1][0] == combo_entity(COMBOS[0], ["10.0.0.1", "7"])
    assert all(plan.counts and not plan.distincts and not plan.last_seen for plan, _ in jobs[1:])


def test_a_signed_out_slice_has_its_devices_signed_in_counterpart():
    assert signed_in_counterpart(slice_of("mobile", False)) == slice_of("mobile", True)
    assert signed_in_counterpart("mobile/logged_in") is None
    assert signed_in_counterpart("logged_out") is None
    assert signed_in_counterpart("unknown") is None
