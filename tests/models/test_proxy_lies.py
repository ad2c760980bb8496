"""Training on a world where the purchase proxy lies (``slidr simulate --world proxy_lies``).

There, logged-out visitors and guests almost never buy, app users buy at another rate,
some humans never buy at all, one slice is nearly all robots and has no human label,
and robots keep human hours: purchasers are not a representative sample of humans.
These tests hold slidr to the truth the simulator knows, not to the proxy.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from data.simulator import simulate
from models.pipeline import TrainOptions, run_training
from models.registry import ModelRegistry

SEED = 2
BUDGET = TrainOptions().fpr_budget


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    data = tmp_path_factory.mktemp("proxy-lies")
    simulate(data, days=4, seed=SEED, clicks_per_day=40_000, world="proxy_lies")
    registry = ModelRegistry(tmp_path_factory.mktemp("registry"))
    messages: list[str] = []
    result = run_training(data, registry, TrainOptions(), progress=messages.append)
    rows = {row["slice"]: row for row in result["proxy_vs_truth"]["rows"]}
    return SimpleNamespace(result=result, messages=messages, rows=rows, registry=registry)


def test_label_poor_slices_are_trained_on_and_said(trained: SimpleNamespace) -> None:
    result = trained.result
    assert result["version"] == "v0001" and result["active"] == "v0001"
    poor = {row["slice"] for row in result["label_poor_slices"]}
    assert "other/logged_out" in poor  # no purchasing click at all
    assert any(m.startswith("label-poor slice other/logged_out") for m in trained.messages)
    label_share = next(g for g in result["guardrails"] if g["name"] == "slice_label_share")
    assert label_share["passed"] and "other/logged_out" in label_share["detail"]


def test_true_human_fpr_within_twice_the_budget(trained: SimpleNamespace) -> None:
    """Overall, and in every slice with humans on the held-out day (at least 10, so that
    one click is not a rate): the nearly-all-robot other/logged_out slice, with about 20
    humans and no purchasing click, included."""
    overall = trained.rows["overall"]
    assert overall["true_human_fpr"] <= 2 * BUDGET, overall
    tested = trained.result["metrics"]["test"]["slices"]
    judged = set()
    for name, figures in tested.items():
        humans = figures["clicks"] - figures["bot_clicks"]
        if humans >= 10:
            judged.add(name)
            assert figures["human_fpr"] <= 2 * BUDGET, (name, figures)
    assert "other/logged_out" in judged and len(judged) >= 6, judged


def test_the_model_does_not_learn_who_gets_labelled(trained: SimpleNamespace) -> None:
    """Logged-in status decides who can buy; buyers signed in and signed out must score
    alike (AUC near 1/2), whereas the label itself depends on it strongly."""
    row = next(r for r in trained.result["propensity"]["rows"] if r["attribute"] == "logged_in")
    assert row["label_auc"] > 0.8
    shipped = trained.result["architecture"]
    assert abs(row[f"score_auc_{shipped}"] - 0.5) < 0.2, row


def test_report_shows_proxy_against_truth_and_the_comparisons(trained: SimpleNamespace) -> None:
    report = (trained.registry.path_of("v0001") / "report.html").read_text(encoding="utf-8")
    for heading in ("Proxy against truth", "Representations", "Label propensity"):
        assert heading in report
    assert trained.rows["overall"]["proxy_fpr"] is not None


def test_report_shows_recall_by_robot_kind_for_every_model(trained: SimpleNamespace) -> None:
    """The world's robot kinds, each with every model's recall, in the result and report."""
    rows = {row["kind"]: row for row in trained.result["recall_by_kind"]}
    assert {"infected_pc", "script", "proxy_rotator", "hijacked"} <= rows.keys()
    for row in rows.values():
        assert row["bots"] > 0
        for model in ("mlp", "lightgbm_same_inputs", "velocity_heuristic"):
            assert 0.0 <= row[model] <= 1.0, (row["kind"], model)
    # Declared crawlers and bare HTTP clients give themselves away to every learnt model.
    assert rows["script"]["mlp"] > 0.9
    report = (trained.registry.path_of("v0001") / "report.html").read_text(encoding="utf-8")
    assert "Bot recall by robot kind" in report


def test_few_signed_out_buyers_carry_the_human_weight_and_training_says_so(
    trained: SimpleNamespace,
) -> None:
    """Balancing label-poor cells concentrates the human weight on their few buyers."""
    weight = trained.result["propensity"]["human_weight"]
    assert weight["effective"] < 0.1 * weight["labelled"], weight
    assert weight["top_1pct_share"] > 0.5, weight
    assert any("labelled humans count as" in m for m in trained.messages)


def test_recall_at_one_percent_human_fpr_beats_gradient_boosted_trees(
    trained: SimpleNamespace,
) -> None:
    """Issue 11's target on this test's seeded data. On 5 days of 40k clicks the default
    was ahead of LightGBM on its own inputs on seeds 2 and 6 (the others not yet measured
    with it; with the user-agent tables encoded too, ahead on all of seeds 1-8); see the
    README, the issue notes and the report's recall by robot kind."""
    rows = {row["model"]: row for row in trained.result["baselines"]}
    ours = rows["mlp"]["bot_recall_at_1pct_human_fpr"]
    for peer in ("lightgbm_all_inputs", "lightgbm_same_inputs"):
        assert ours > rows[peer]["bot_recall_at_1pct_human_fpr"], peer


def test_recall_holds_against_gradient_boosted_trees(trained: SimpleNamespace) -> None:
    """Well ahead of trees that see who gets labelled (on seeds 1-8 of 5 days of 40k
    clicks by 0.24 or more), and on this seed within 0.05 of trees on slidr's own inputs
    (with the ad and advertiser alone encoded, against the overall rate, slidr trailed by
    up to 0.060 on seeds 1-8; encoded against the cells with the advertiser x publisher
    pair, it led on every seed measured)."""
    rows = {
        row["model"]: row["bot_recall_at_1pct_human_fpr"] for row in trained.result["baselines"]
    }
    assert rows["mlp"] > rows["lightgbm_all_inputs"] + 0.2, rows
    assert rows["mlp"] > rows["lightgbm_same_inputs"] - 0.05, rows
