"""The offline ``slidr`` commands through ``slidr.cli.main``: train, score, evaluate, models.

One simulation (4 days at 20,000 clicks a day) is trained once for the module; scoring
runs on a second, smaller data set so that the per-event featurizer stays quick.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from data.dataset import load_dataset
from data.simulator import simulate
from events.errors import EXIT_ERROR, EXIT_GUARDRAIL
from events.schemas import parse_click
from features.batch import compute_features
from features.definitions import ClickFeaturizer
from features.store import MemoryStore
from models.registry import ModelRegistry
from models.scoring import reason_codes
from slidr.cli import build_parser, main

SCORE_COLUMNS = {"click_id", "score", "verdict", "slice", "reasons"}


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> SimpleNamespace:
    """``slidr ARGV`` in-process: exit code, stdout and stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return SimpleNamespace(code=code, out=out, err=err)


def assert_one_line_error(result: SimpleNamespace, command: str, *fragments: str) -> None:
    assert result.code == EXIT_ERROR
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"slidr {command}: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("cli")
    simulate(root / "train", days=4, seed=5, clicks_per_day=20_000)
    simulate(root / "score", days=2, seed=9, clicks_per_day=3_000)
    return SimpleNamespace(
        root=root, train=root / "train", score=root / "score", registry=root / "registry"
    )


@pytest.fixture(scope="module")
def trained(dirs: SimpleNamespace) -> str:
    """``slidr train`` once; its stdout (pytest's capsys is function-scoped)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", "--data", str(dirs.train), "--registry", str(dirs.registry)])
    assert code == 0, err.getvalue()
    return out.getvalue()


# --- train and models ------------------------------------------------------------------


def test_train_registers_and_prints_a_summary(trained: str, dirs: SimpleNamespace) -> None:
    assert trained.startswith("registered v0001 (active: v0001)")
    assert f"report: {dirs.registry / 'versions' / 'v0001' / 'report.html'}" in trained
    for model in ("mlp", "logistic_regr", "velocity_heur"):
        assert model in trained
    assert ModelRegistry(dirs.registry).active_version() == "v0001"


def test_models_lists_versions(trained: str, dirs: SimpleNamespace, capsys, tmp_path: Path) -> None:
    result = run(capsys, "models", "--registry", dirs.registry)
    assert result.code == 0
    rows = [line for line in result.out.splitlines() if "v0001" in line]
    assert len(rows) == 1 and rows[0].startswith("* v0001") and rows[0].endswith("active")
    empty = run(capsys, "models", "--registry", tmp_path / "empty")
    assert empty.code == 0
    assert empty.out.startswith("no versions in")


def test_registry_comes_from_the_environment(
    trained: str, dirs: SimpleNamespace, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("SLIDR_REGISTRY", str(dirs.registry))
    result = run(capsys, "models")
    assert result.code == 0
    assert "* v0001" in result.out


def test_guardrail_failure_exits_3_naming_it(
    trained: str, dirs: SimpleNamespace, capsys, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(dirs.registry, registry)
    tiny = tmp_path / "tiny"
    simulate(tiny, days=3, seed=1, clicks_per_day=150)  # ~300 training clicks < 1,000
    result = run(capsys, "train", "--data", tiny, "--registry", registry)
    assert result.code == EXIT_GUARDRAIL
    assert "Traceback" not in result.err
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("slidr train: error: guardrail failed: min_clicks")
    assert "nothing registered, active version unchanged" in last
    assert [m["version"] for m in ModelRegistry(registry).versions()] == ["v0001"]
    assert ModelRegistry(registry).active_version() == "v0001"


# --- score -----------------------------------------------------------------------------


def read_scores(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_score_writes_one_row_per_click(
    trained: str, dirs: SimpleNamespace, capsys, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"scores{suffix}"
    result = run(capsys, "score", "--data", dirs.score, "--registry", dirs.registry, "--out", out)
    assert result.code == 0, result.err
    rows = read_scores(out)
    click_ids = pq.read_table(dirs.score / "clicks.parquet").column("click_id").to_pylist()
    assert len(rows) == len(click_ids)
    assert sorted(r["click_id"] for r in rows) == sorted(click_ids)
    for row in rows:
        assert row.keys() >= SCORE_COLUMNS
        assert 0.0 <= row["score"] <= 1.0
        assert row["verdict"] in ("valid", "invalid")
        assert row["model_version"] == "v0001"
        assert (row["verdict"] == "invalid") == (row["score"] >= row["threshold"])
        assert (row["verdict"] == "invalid") == bool(row["reasons"])
    assert f"-> {out}" in result.err


@pytest.fixture(scope="module")
def incremental(dirs: SimpleNamespace) -> SimpleNamespace:
    """Per-event features of the scoring data: raw click events parsed like the worker
    does, fed to a ClickFeaturizer on memory stores in event-time order."""
    raw = pq.read_table(dirs.score / "clicks.parquet").to_pylist()
    clicks = [parse_click({k: v for k, v in row.items() if v is not None}) for row in raw]
    clicks.sort(key=lambda c: c["ts"])  # stable: ties keep file order, as the loader does
    featurizer = ClickFeaturizer(MemoryStore(), MemoryStore())
    matrices, slices = [], []
    for start in range(0, len(clicks), 500):
        features = featurizer.featurize(clicks[start : start + 500])
        matrices.append(features.matrix)
        slices.extend(features.slices)
    return SimpleNamespace(
        click_id=[c["click_id"] for c in clicks], matrix=np.vstack(matrices), slices=slices
    )


def test_score_equals_the_per_event_path(
    trained: str, dirs: SimpleNamespace, incremental: SimpleNamespace, capsys, tmp_path: Path
) -> None:
    # The vectorised features score uses equal the per-event ones ...
    data = load_dataset(dirs.score)
    assert list(data.clicks.click_id) == incremental.click_id
    batch, batch_slices = compute_features(data.clicks)
    np.testing.assert_allclose(batch, incremental.matrix, rtol=1e-6, atol=1e-6)
    assert list(batch_slices) == incremental.slices

    # ... and so do the scores, verdicts and reasons `slidr score` writes.
    out = tmp_path / "scores.jsonl"
    assert (
        run(capsys, "score", "--data", dirs.score, "--registry", dirs.registry, "--out", out).code
        == 0
    )
    rows = {r["click_id"]: r for r in read_scores(out)}
    model = ModelRegistry(dirs.registry).load("v0001", prefer_gpu=False)
    scores = model.scorer.score(incremental.matrix)
    thresholds = model.thresholds_for(incremental.slices)
    for i, click_id in enumerate(incremental.click_id):
        row = rows[click_id]
        assert row["score"] == pytest.approx(scores[i], abs=1e-6)
        assert row["slice"] == incremental.slices[i]
        invalid = scores[i] >= thresholds[i]
        assert row["verdict"] == ("invalid" if invalid else "valid")
        assert row["reasons"] == (reason_codes(incremental.matrix[i]) if invalid else [])
    assert any(r["verdict"] == "invalid" for r in rows.values())


def test_score_errors_are_one_line(
    trained: str, dirs: SimpleNamespace, capsys, tmp_path: Path
) -> None:
    def score(data: Path, registry: Path = dirs.registry, out: str = "s.jsonl", *extra: str):
        return run(
            capsys, "score", "--data", data, "--registry", registry, "--out", tmp_path / out, *extra
        )

    missing = tmp_path / "no-such-data"
    assert_one_line_error(score(missing), "score", str(missing))
    assert_one_line_error(score(dirs.score, out="s.csv"), "score", ".jsonl or .parquet", "s.csv")
    assert_one_line_error(
        score(dirs.score, dirs.registry, "s.jsonl", "--model", "v0099"),
        "score",
        "no version 'v0099'",
    )
    assert_one_line_error(score(dirs.score, tmp_path / "empty"), "score", "no active version")
    assert not (tmp_path / "s.jsonl").exists() and not (tmp_path / "s.csv").exists()


# --- evaluate --------------------------------------------------------------------------


def test_evaluate_prints_metrics_json(trained: str, dirs: SimpleNamespace, capsys) -> None:
    result = run(
        capsys, "evaluate", "--data", dirs.score, "--registry", dirs.registry, "--model", "v0001"
    )
    assert result.code == 0, result.err
    metrics = orjson.loads(result.out)
    assert metrics["model_version"] == "v0001"
    assert metrics["clicks"] == pq.read_metadata(dirs.score / "clicks.parquet").num_rows
    overall = metrics["overall"]
    assert {"ivr", "fpr", "coverage", "bot_recall", "human_fpr", "precision"} <= overall.keys()
    assert 0 < overall["ivr"] < 1
    assert metrics["slices"]
    assert sum(s["clicks"] for s in metrics["slices"].values()) == metrics["clicks"]
    assert "malformed_rows" not in metrics, "a clean data set reports no malformed rows"


def test_evaluate_errors_are_one_line(
    trained: str, dirs: SimpleNamespace, capsys, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-data"
    assert_one_line_error(
        run(capsys, "evaluate", "--data", missing, "--registry", dirs.registry),
        "evaluate",
        str(missing),
    )
    assert_one_line_error(
        run(
            capsys,
            "evaluate",
            "--data",
            dirs.score,
            "--registry",
            dirs.registry,
            "--model",
            "v0099",
        ),
        "evaluate",
        "no version 'v0099'",
        "known: v0001",
    )
    assert_one_line_error(
        run(capsys, "train", "--data", missing, "--registry", tmp_path / "r"), "train", str(missing)
    )


# --- help ------------------------------------------------------------------------------


def subcommands() -> list[str]:
    actions = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


def test_every_subcommand_has_help(capsys) -> None:
    names = subcommands()
    assert {"simulate", "train", "evaluate", "score", "models"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: slidr {name}"), name
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in names)


def test_worker_without_a_usable_model_fails_fast_naming_it(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """No broker is contacted: the model is checked first."""
    from slidr.cli import main

    monkeypatch.setenv("SLIDR_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    monkeypatch.setenv("SLIDR_REDIS_URL", "redis://127.0.0.1:9/0")
    monkeypatch.setenv("SLIDR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLIDR_REGISTRY", str(tmp_path / "empty"))
    assert main(["worker"]) == 2
    assert "no active version" in capsys.readouterr().err

    from models.registry import ModelRegistry

    registry = tmp_path / "registry"
    reg = ModelRegistry(registry)
    staging = reg.staging_dir()
    (staging / "thresholds.json").write_text('{"slices": {}, "default": 0.5}')
    (staging / "model.onnx").write_bytes(b"not an onnx model")
    reg.register(staging, {"metrics": {}, "guardrails": [{"name": "g", "passed": True}]})
    monkeypatch.setenv("SLIDR_REGISTRY", str(registry))
    assert main(["worker"]) == 2
    err = capsys.readouterr().err
    assert "model.onnx" in err and "cannot be loaded" in err
    (registry / "versions" / "v0001" / "model.onnx").chmod(0o600)
    (registry / "versions" / "v0001" / "model.onnx").unlink()
    assert main(["worker"]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_train_option_errors_are_one_line(capsys, tmp_path: Path) -> None:
    for flag, value, fragment in (
        ("--architectures", "mlp_hashed,resnet", "unknown ['resnet']"),
        ("--propensity-features", "logged_in,shoe_size", "not feature names: ['shoe_size']"),
        ("--members-per-fold", "0", "members_per_fold must be at least 1, got 0"),
    ):
        result = run(capsys, "train", "--data", tmp_path, "--registry", tmp_path / "r", flag, value)
        assert_one_line_error(result, "train", fragment)
    result = run(
        capsys,
        "retrain",
        "--data",
        tmp_path,
        "--registry",
        tmp_path / "r",
        "--members-per-fold",
        "0",
    )
    assert_one_line_error(result, "retrain", "members_per_fold must be at least 1, got 0")
