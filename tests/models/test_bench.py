"""The offline benchmark runs end to end and reports its figures (tiny size: a smoke test)."""

from __future__ import annotations

from pathlib import Path

from models.bench import machine_info, run_offline_bench, to_text
from models.pipeline import TrainOptions


def test_offline_bench_reports_figures(tmp_path: Path) -> None:
    messages: list[str] = []
    figures = run_offline_bench(clicks=1_200, workdir=tmp_path, progress=messages.append)
    assert 1_000 <= figures["clicks"] <= 1_400
    assert figures["days"] == 4
    assert len(figures["features"]["runs_s"]) == 3
    assert figures["features"]["clicks_per_s"] > 0
    # Too few clicks to train on: the guardrail's refusal is reported, not raised.
    assert "min_clicks" in figures["training"]["error"]
    assert figures["training"]["total_s"] >= 0
    assert figures["machine"] == machine_info()
    text = to_text(figures)
    assert "features" in text and "clicks/s" in text and "training    failed" in text
    assert messages, "progress is reported"
    assert list(tmp_path.glob("registry-*")), "a fresh registry in the work directory"


def test_offline_bench_reports_the_training_it_ran(tmp_path: Path) -> None:
    figures = run_offline_bench(clicks=16_000, workdir=tmp_path, progress=lambda _m: None)
    training = figures["training"]
    assert "error" not in training, training
    assert training["architecture"] in training["fit_s"]
    assert {"logistic_regression", training["architecture"]} <= training["fit_s"].keys()
    # The three days before the held-out one, each held out by as many networks.
    assert len(training["fold_epochs"]) == 3 * training["members_per_fold"]
    assert training["members_per_fold"] == TrainOptions().members_per_fold
    text = to_text(figures)
    assert f"shipped {training['architecture']}" in text and "cross-fits" in text
