"""The retrain job (``slidr retrain``): the training window and its attribution delay,
the late purchases it keeps, the run history, and end to end on a small simulation with
the embedded broker: healthy versions are promoted (registry and ``slidr.control``), a
training set whose purchases are missing 09-12 UTC every day is rejected by
``purchase_label_density`` with the active version unchanged."""

from __future__ import annotations

import contextlib
import io
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest

from features.windows import DAY_S
from lifecycle.retrain import (
    EXIT_PROMOTED,
    EXIT_REJECTED,
    RetrainError,
    cut_window,
    read_runs,
    training_window,
)
from slidr.cli import build_parser


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


# -- the training window ------------------------------------------------------------------


def test_the_newest_day_waits_for_the_attribution_delay() -> None:
    # 2026-11-05 ends at 11-06 00:00; with a 24 h delay it is usable from 11-07 00:00.
    before = training_window(at("2026-11-06T23:59:59"), days=4, delay_s=DAY_S)
    after = training_window(at("2026-11-07T00:00:00"), days=4, delay_s=DAY_S)
    assert before.days == ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"]
    assert after.days == ["2026-11-02", "2026-11-03", "2026-11-04", "2026-11-05"]
    assert after.labels_until == at("2026-11-07T00:00:00")
    longer = training_window(at("2026-11-07T05:00:00"), days=4, delay_s=30 * 3600)
    assert longer.days[-1] == "2026-11-04"


def test_the_window_ends_with_the_sources_newest_click() -> None:
    window = training_window(
        at("2026-11-26T12:00:00"), days=3, delay_s=DAY_S, newest_click=at("2026-11-05T17:00:00")
    )
    assert window.days == ["2026-11-03", "2026-11-04", "2026-11-05"]
    with pytest.raises(RetrainError, match="at least 3"):
        training_window(at("2026-11-26T12:00:00"), days=2, delay_s=DAY_S)


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))


def test_cut_window_keeps_only_the_late_purchases_of_the_windows_clicks(tmp_path: Path) -> None:
    """After the window, a purchase without click_id belongs to its user's latest click
    before it: kept only when that click is in the window (else it would mark the user's
    last window click as purchasing)."""
    day = at("2026-11-02T00:00:00")
    clicks = [
        {"click_id": f"c{d}-{u}", "ts": day + d * DAY_S + 3600, "user_id": u, "ip": "10.0.0.1"}
        for d in range(5)
        for u in ("stay", "back")
        if not (u == "stay" and d == 4)
    ]
    clicks.append({"click_id": "malformed", "ts": "yesterday", "user_id": "x", "ip": "1"})
    end = day + 4 * DAY_S  # now = 11-07 00:00, delay 24 h, 4 days: window 11-02 .. 11-05
    purchases = [
        {"purchase_id": "history", "ts": day - 30 * DAY_S, "user_id": "stay"},
        {"purchase_id": "inside", "ts": day + 2 * DAY_S, "user_id": "stay"},
        {"purchase_id": "late-kept", "ts": end + 1800, "user_id": "stay"},  # no later click
        {"purchase_id": "late-named", "ts": end + 7200, "user_id": "back", "click_id": "c3-back"},
        {"purchase_id": "late-later-click", "ts": end + 7200, "user_id": "back"},  # c4-back at +1 h
        {"purchase_id": "too-late", "ts": end + DAY_S + 60, "user_id": "stay"},
    ]
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src / "clicks.jsonl", clicks)
    _jsonl(src / "purchases.jsonl", purchases)
    window, counts = cut_window(
        src, tmp_path / "out", now=at("2026-11-07T00:00:00"), days=4, delay_s=DAY_S
    )
    assert window.days == ["2026-11-02", "2026-11-03", "2026-11-04", "2026-11-05"]
    kept_clicks = [
        orjson.loads(line)["click_id"]
        for line in (tmp_path / "out/clicks.jsonl").read_bytes().splitlines()
    ]
    kept = [
        orjson.loads(line)["purchase_id"]
        for line in (tmp_path / "out/purchases.jsonl").read_bytes().splitlines()
    ]
    assert sorted(kept_clicks) == sorted(f"c{d}-{u}" for d in range(4) for u in ("stay", "back"))
    assert kept == ["history", "inside", "late-kept", "late-named"]
    assert counts == {
        "clicks": 8,
        "purchases": 4,
        "first_day": "2026-11-02",
        "last_day": "2026-11-05",
    }


def test_a_window_without_clicks_is_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(
        src / "clicks.jsonl",
        [{"click_id": "a", "ts": at("2026-11-02T01:00:00"), "user_id": "u", "ip": "1"}],
    )
    _jsonl(src / "purchases.jsonl", [])
    with pytest.raises(RetrainError, match="no clicks in the window"):
        cut_window(src, tmp_path / "out", now=at("2026-11-03T12:00:00"), days=3, delay_s=DAY_S)


def test_the_archive_gives_the_same_window_as_a_data_directory(tmp_path: Path) -> None:
    """``--archive`` (stream.archive.export_days) and ``--data`` train on the same rows."""
    from data.dataset import load_dataset
    from data.simulator import simulate
    from lifecycle.retrain import export_archive_window
    from stream.archive import ArchiveWriter
    from stream.producer import click_payload, purchase_payload

    simulate(tmp_path / "sim", days=4, seed=5, clicks_per_day=2_000)
    data = load_dataset(tmp_path / "sim")
    writer = ArchiveWriter(tmp_path / "archive", fsync=False)
    for i in range(len(data.clicks)):
        writer.add("clicks", click_payload(data.clicks, i))
    for j in range(len(data.purchases)):
        writer.add("purchases", purchase_payload(data.purchases, j))
    writer.flush()
    now = at("2026-11-06T12:00:00")  # 11-04 labelled since 11-06 00:00; 11-05 not yet
    a_window, a_counts = export_archive_window(
        tmp_path / "archive", tmp_path / "from-archive", now, 3, DAY_S
    )
    d_window, d_counts = cut_window(tmp_path / "sim", tmp_path / "from-dir", now, 3, DAY_S)
    assert a_window == d_window and a_window.days == ["2026-11-02", "2026-11-03", "2026-11-04"]
    assert a_counts == d_counts
    a, d = load_dataset(tmp_path / "from-archive"), load_dataset(tmp_path / "from-dir")
    assert sorted(a.clicks.click_id) == sorted(d.clicks.click_id)
    assert sorted(a.purchases.purchase_id) == sorted(d.purchases.purchase_id)
    assert not (tmp_path / "from-archive-archive").exists()  # the raw export is cleaned up


# -- end to end: simulation -> retrain -> promote / reject ---------------------------------

# 5 simulated weekdays (2026-11-02 .. 06) of ~20k clicks; retrains see the first 3 or 4
# days. Fewer epochs than the default keep a training run under ~10 s.
SIMULATION = {"days": 5, "seed": 3, "clicks_per_day": 20_000}
TRAIN_FLAGS = ["--epochs", "4", "--min-coverage", "0"]


def slidr(argv: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``slidr retrain ...`` in process, as the CLI would; (exit code, stdout + stderr)."""
    args = build_parser().parse_args(argv)
    out = io.StringIO()
    with (
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(out),
    ):
        for name, value in env.items():
            mp.setenv(name, value)
        code = args.func(args)
    return code, out.getvalue()


def control_messages(settings, expected: int, timeout: float = 15.0) -> list[dict]:
    from confluent_kafka import Consumer, TopicPartition

    from stream.kafka import CONTROL, consumer_config

    consumer = Consumer(consumer_config(settings, group_id=f"read-{uuid.uuid4().hex[:8]}"))
    consumer.assign([TopicPartition(settings.topic(CONTROL), 0, 0)])
    messages: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            messages += [
                orjson.loads(m.value()) for m in consumer.consume(100, 0.2) if not m.error()
            ]
    finally:
        consumer.close()
    return messages


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from data.simulator import simulate

    out = tmp_path_factory.mktemp("retrain-sim") / "data"
    simulate(out, **SIMULATION)
    return out


@pytest.fixture(scope="module")
def promoted(stack, simulation: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two retrain runs, a day apart: the first version, then one judged against it."""
    home = tmp_path_factory.mktemp("retrain-home")
    settings = stack.settings.replace(
        topic_prefix=f"rt{uuid.uuid4().hex[:10]}-", registry=home / "registry", home=home
    )
    env = {
        "SLIDR_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "SLIDR_REGISTRY": str(settings.registry),
        "SLIDR_HOME": str(home),
        "SLIDR_TOPIC_PREFIX": settings.topic_prefix,
    }
    runs = []
    for now in ("2026-11-06T06:00", "2026-11-07T06:00"):
        started = time.perf_counter()
        code, out = slidr(
            ["retrain", "--data", str(simulation), "--days", "5", "--now", now, *TRAIN_FLAGS], env
        )
        runs.append({"code": code, "out": out, "seconds": time.perf_counter() - started})
    return {"settings": settings, "env": env, "runs": runs}


def test_healthy_retrains_are_promoted_and_announced(promoted: dict) -> None:
    from models.registry import ModelRegistry

    settings, runs = promoted["settings"], promoted["runs"]
    for run in runs:
        assert run["code"] == EXIT_PROMOTED, run["out"]
    assert "promoted v0001 (was none)" in runs[0]["out"]
    assert "promoted v0002 (was v0001)" in runs[1]["out"]
    registry = ModelRegistry(settings.registry)
    assert registry.active_version() == "v0002"
    assert registry.stable_versions() == ["v0001", "v0002"]

    history = read_runs(settings.registry)
    assert [r["outcome"] for r in history] == ["promoted", "promoted"]
    first, second = history
    assert (first["data"]["first_day"], first["data"]["last_day"]) == ("2026-11-02", "2026-11-04")
    assert (second["data"]["first_day"], second["data"]["last_day"]) == ("2026-11-02", "2026-11-05")
    assert first["data"]["fingerprint"] != second["data"]["fingerprint"]
    assert second["active_before"] == "v0001" and second["active_after"] == "v0002"
    names = [g["name"] for g in second["guardrails"]]
    for name in (
        "purchase_label_density",
        "heldout_ivr_ratio",
        "heldout_fpr",
        "slice_fpr_budget",
        "slice_ivr_jump",
        "score_psi",
    ):
        assert name in names
    compared = {g["name"]: g for g in second["guardrails"]}
    assert compared["score_psi"]["value"] is not None  # judged against v0001 on the same clicks
    assert "v0001 on the same held-out clicks" in compared["heldout_ivr_ratio"]["detail"]
    manifest = registry.manifest("v0002")
    assert manifest["model_guardrails"] == {"passed": True, "failed": []}

    messages = control_messages(settings, expected=2)
    assert [(m["action"], m["model_version"]) for m in messages] == [
        ("activate", "v0001"),
        ("activate", "v0002"),
    ]
    assert messages[1]["reason"].startswith("retrain ")
    seconds = ", ".join(f"{r['seconds']:.1f} s" for r in runs)
    print(f"\nretrain runs (train + checks + promote): {seconds}")


def test_purchases_missing_every_morning_are_rejected_and_the_active_version_stays(
    promoted: dict, simulation: Path, tmp_path: Path
) -> None:
    from models.registry import ModelRegistry

    # The promoted registry, copied: this test adds a run without touching the other's.
    registry_path = tmp_path / "registry"
    shutil.copytree(promoted["settings"].registry, registry_path)
    env = {**promoted["env"], "SLIDR_REGISTRY": str(registry_path), "SLIDR_HOME": str(tmp_path)}
    holed = tmp_path / "holed"
    holed.mkdir()
    shutil.copyfile(simulation / "clicks.parquet", holed / "clicks.parquet")
    purchases = pq.read_table(simulation / "purchases.parquet")
    hour = (purchases.column("ts").to_numpy() % DAY_S) // 3600
    pq.write_table(purchases.filter(~((hour >= 9) & (hour < 12))), holed / "purchases.parquet")

    code, out = slidr(
        ["retrain", "--data", str(holed), "--days", "5", "--now", "2026-11-07T06:00", *TRAIN_FLAGS],
        env,
    )
    assert code == EXIT_REJECTED, out
    assert "rejected: data guardrail purchase_label_density failed" in out
    assert "09:00-12:00 UTC daily" in out
    assert "active version unchanged (v0002)" in out
    registry = ModelRegistry(registry_path)
    assert registry.active_version() == "v0002"
    assert [m["version"] for m in registry.versions()] == ["v0001", "v0002"]  # nothing registered

    runs = read_runs(registry_path)
    assert len(runs) == 3
    last = runs[-1]
    assert last["outcome"] == "rejected" and last["promoted"] is False and last["version"] is None
    assert [g["name"] for g in last["guardrails"] if not g["passed"]] == ["purchase_label_density"]
    assert last["data"]["fingerprint"] and last["window"]["from"] == "2026-11-01"

    code, table = slidr(["retrain", "--history"], env)
    assert code == 0
    lines = table.splitlines()
    assert len(lines) == 5 and "failed: purchase_label_density" in lines[-1]
    assert [line.split()[2] for line in lines[2:]] == ["promoted", "promoted", "rejected"]


def test_a_rejected_model_is_registered_but_not_promoted(
    promoted: dict, simulation: Path, tmp_path: Path
) -> None:
    """A model guardrail set impossibly strict: the version is kept for inspection, the
    active one stays, nothing is announced."""
    from models.registry import ModelRegistry

    registry_path = tmp_path / "registry"
    shutil.copytree(promoted["settings"].registry, registry_path)
    env = {
        **promoted["env"],
        "SLIDR_REGISTRY": str(registry_path),
        "SLIDR_HOME": str(tmp_path),
        "SLIDR_TOPIC_PREFIX": f"rj{uuid.uuid4().hex[:10]}-",
    }
    code, out = slidr(
        [
            "retrain",
            "--data",
            str(simulation),
            "--days",
            "5",
            "--now",
            "2026-11-07T06:00",
            "--limit",
            "max_score_psi=0",
            "--seed",
            "11",
            *TRAIN_FLAGS,
        ],
        env,
    )
    assert code == EXIT_REJECTED, out
    assert "model guardrail score_psi failed" in out and "v0003 registered, not promoted" in out
    registry = ModelRegistry(registry_path)
    assert registry.active_version() == "v0002"
    assert registry.manifest("v0003")["model_guardrails"] == {
        "passed": False,
        "failed": ["score_psi"],
    }
    assert read_runs(registry_path)[-1]["version"] == "v0003"


def test_no_data_in_the_window_is_an_error_with_a_history_line(
    simulation: Path, tmp_path: Path
) -> None:
    env = {"SLIDR_REGISTRY": str(tmp_path / "registry"), "SLIDR_HOME": str(tmp_path)}
    code, out = slidr(["retrain", "--data", str(simulation), "--now", "2026-11-03T12:00"], env)
    assert code == 2 and "no clicks in the window" in out
    (run,) = read_runs(tmp_path / "registry")
    assert run["outcome"] == "error" and run["version"] is None


def test_history_of_an_empty_registry(tmp_path: Path) -> None:
    code, out = slidr(["retrain", "--history", "--registry", str(tmp_path)], {})
    assert code == 0 and "no retrain runs" in out


# -- compare-and-set with a promotion made during training -------------------------------


@pytest.mark.parametrize("first", [False, True])
def test_a_switch_made_while_the_retrain_trained_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: bool
) -> None:
    """The new version was judged against the active record read at the start: when that
    record moved on meanwhile (a promotion or rollback), the retrain does not overwrite
    it. Training and the window are stand-ins: this is about the promotion step."""
    import models.pipeline
    from events.settings import Settings
    from lifecycle import retrain as job
    from models.registry import ModelRegistry
    from models.testing import register_logistic_model

    registry = ModelRegistry(tmp_path / "registry")
    if not first:
        register_logistic_model(registry, {"ua_crawler": 10.0}, bias=-5.0)  # v0001, active
        register_logistic_model(registry, {}, bias=-4.0)  # v0002, promoted by hand below

    def window(source: Path, out: Path, now: float, days: int, delay_s: float):
        out.mkdir(parents=True)
        counts = {"first_day": "2026-11-01", "last_day": "2026-11-02", "clicks": 1, "purchases": 0}
        return job.DataWindow(at("2026-11-01"), at("2026-11-03"), at("2026-11-04")), counts

    def train(directory, reg, options, progress, model_check=None) -> dict:
        if not first:
            reg.activate("v0002", reason="promoted by hand during the retrain")
        version = register_logistic_model(reg, {"ua_crawler": 9.0}, bias=-5.0)
        ok = {"name": "g", "passed": True}
        metrics = {"test": {"overall": {"ivr": 0.1, "fpr": 0.01, "coverage": 0.9}}}
        return {
            "version": version,
            "guardrails": [ok],
            "metrics": metrics,
            "active": reg.active_version(),
        }

    monkeypatch.setattr(job, "cut_window", window)
    monkeypatch.setattr(models.pipeline, "run_training", train)
    settings = Settings(home=tmp_path / "home", registry=registry.root)
    outcome = job.retrain(
        tmp_path, settings, job.RetrainOptions(publish=False), progress=lambda _m: None
    )
    if first:  # no switch meanwhile: the first version is registered active and stays
        assert outcome.exit_code == EXIT_PROMOTED, outcome.record["reason"]
        assert registry.active_version() == "v0001"
        return
    assert outcome.exit_code == 2
    assert "the active record moved on" in outcome.record["reason"]
    assert registry.active_version() == "v0002", "the promotion made by hand stands"
    assert outcome.record["active_after"] == "v0002"
