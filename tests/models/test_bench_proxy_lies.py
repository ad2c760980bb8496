"""The proxy-lies benchmark's bookkeeping: which seeds meet issue 11's targets, the means
and the recall by robot kind (the training itself is tested in test_proxy_lies.py)."""

from __future__ import annotations

import pytest

from models import bench_proxy_lies as bench

BUDGET = 0.02


def training_result(
    mlp: float, peer: float, slices: dict[str, tuple[int, int, float]], kinds: dict
) -> dict:
    """The parts of a ``run_training`` summary the benchmark reads; ``slices``: name ->
    (clicks, bot clicks, true human FPR)."""
    figures = {
        name: {"clicks": c, "bot_clicks": b, "human_fpr": f} for name, (c, b, f) in slices.items()
    }
    humans = sum(c - b for c, b, _ in slices.values())
    overall = sum((c - b) * f for c, b, f in slices.values()) / humans
    return {
        "architecture": "dcn_embeddings",
        "baselines": [
            {"model": "mlp", "bot_recall_at_1pct_human_fpr": mlp},
            {"model": bench.PEER, "bot_recall_at_1pct_human_fpr": peer},
            {"model": "velocity_heuristic", "bot_recall_at_1pct_human_fpr": 0.4},
        ],
        "metrics": {"test": {"overall": {"human_fpr": overall}, "slices": figures}},
        "recall_by_kind": [
            {"kind": k, "bots": 100, "mlp": a, bench.PEER: b} for k, (a, b) in kinds.items()
        ],
    }


def test_a_slice_with_too_few_humans_is_not_judged_and_one_with_enough_is() -> None:
    # 5 humans at 20% FPR (one click) are not a rate; 20 humans at 5% are over 2x budget.
    few = training_result(
        0.7, 0.6, {"a": (1000, 0, 0.01), "b": (105, 100, 0.2)}, {"burst": (0.9, 0.8)}
    )
    row = bench.seed_row(1, few, BUDGET)
    assert row["fpr_target_met"] and row["recall_target_met"]
    assert row["worst_slice"] == "a"
    enough = training_result(0.7, 0.6, {"a": (1000, 0, 0.01), "b": (120, 100, 0.05)}, {})
    row = bench.seed_row(2, enough, BUDGET)
    assert not row["fpr_target_met"]
    assert (row["worst_slice"], row["worst_slice_humans"]) == ("b", 20)
    assert row["recall"]["logistic_regression"] is None  # absent models stay None


def test_summary_counts_the_seeds_meeting_each_target_and_averages_by_kind() -> None:
    rows = [
        bench.seed_row(
            1, training_result(0.7, 0.6, {"a": (500, 0, 0.01)}, {"x": (0.9, 0.5)}), BUDGET
        ),
        bench.seed_row(
            2, training_result(0.5, 0.6, {"a": (500, 0, 0.01)}, {"x": (0.5, 0.7)}), BUDGET
        ),
        bench.seed_row(
            3, training_result(0.8, 0.6, {"a": (500, 0, 0.09)}, {"x": (0.7, 0.6)}), BUDGET
        ),
    ]
    summary = bench.summarize(rows)
    assert summary["recall_target_met_on_seeds"] == [1, 3]
    assert summary["fpr_target_met_on_seeds"] == [1, 2]
    assert summary["both_met_on_seeds"] == [1]
    assert summary["mean_recall"]["mlp"] == pytest.approx(2.0 / 3)
    assert summary["mean_recall"]["velocity_heuristic"] == pytest.approx(0.4)
    assert summary["recall_by_kind"]["x"]["mlp"] == pytest.approx(0.7)
    assert summary["recall_by_kind"]["x"]["mlp_ahead_on_seeds"] == [1, 3]
    text = bench.to_text(
        {
            "days": 5,
            "clicks_per_day": 40_000,
            "fpr_budget": BUDGET,
            "seeds": rows,
            "summary": summary,
        }
    )
    assert "recall above lightgbm_same_inputs on 2 of 3 seeds [1, 3]" in text
    assert "both on 1 [1]" in text


def test_cli_refuses_bad_settings_by_name(capsys) -> None:
    for argv, setting in (
        (["--seeds", "x"], "--seeds"),
        (["--days", "2"], "--days"),
        (["--clicks-per-day", "10"], "--clicks-per-day"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        assert setting in capsys.readouterr().err
