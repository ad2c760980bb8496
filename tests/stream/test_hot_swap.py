"""Hot swap: a version promoted while clicks flow through a real worker takes over
between micro-batches, with no click left undecided and no decision from a third
version; the switch time (promotion -> first decision by the new version) is printed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import orjson

from models.registry import ModelRegistry
from stream.control import promote
from tests.stream.worker_harness import DecisionReader, PacedProducer, click_record, unique

CLICKS = 3_000
RATE = 300  # clicks/s: ~10 s of traffic


def register_copy(registry: ModelRegistry, version: str, threshold_shift: float) -> str:
    """Register ``version``'s model again, every threshold moved by ``threshold_shift``."""
    staging = registry.staging_dir()
    for path in registry.path_of(version).iterdir():
        if path.is_file() and path.name != "manifest.json":
            shutil.copyfile(path, staging / path.name)
    doc = orjson.loads((staging / "thresholds.json").read_bytes())
    doc["slices"] = {k: v + threshold_shift for k, v in doc["slices"].items()}
    doc["default"] += threshold_shift
    (staging / "thresholds.json").write_bytes(orjson.dumps(doc))
    manifest = {
        k: v for k, v in registry.manifest(version).items() if k not in ("version", "registered_at")
    }
    return registry.register(
        staging, {**manifest, "note": f"{version}, thresholds {threshold_shift:+}"}
    )


def test_promotion_while_clicks_flow_switches_between_batches(
    workers, worker_settings, trained_model, dataset, tmp_path: Path
) -> None:
    registry_path = tmp_path / "registry"  # a copy: the session's registry stays as it is
    shutil.copytree(trained_model.registry, registry_path)
    settings = worker_settings.replace(registry=registry_path)
    registry = ModelRegistry(registry_path)
    old = registry.active_version()
    new = register_copy(registry, old, threshold_shift=0.01)
    thresholds = {
        v: orjson.loads((registry.path_of(v) / "thresholds.json").read_bytes()) for v in (old, new)
    }

    worker = workers.new("worker", group_id=unique("hot-swap"), settings=settings)
    worker.start()
    reader = DecisionReader(settings)
    cols = dataset.clicks
    clicks = [cols.row(i) for i in range(min(len(cols), CLICKS))]
    producer = PacedProducer(settings, [click_record(c) for c in clicks], rate=RATE)
    try:
        producer.start()
        assert reader.wait_for_count(500, 60, alive=lambda: worker.running) >= 500, (
            workers.describe()
        )
        promoted_at = time.time()
        promote(settings, new, reason="test: hot swap")
        acknowledged_at = time.time()
        producer.finish(60)
        missing = reader.wait_for([c["click_id"] for c in clicks], 90, alive=lambda: worker.running)
    finally:
        producer.stop_event.set()
        reader.close()
    assert not missing, f"{len(missing)} clicks without a decision\n{workers.describe()}"

    by_version: dict[str, list[dict]] = {}
    for d in reader.decisions:
        by_version.setdefault(d["model_version"], []).append(d)
    assert set(by_version) == {old, new}, sorted(by_version)
    for version, decisions in by_version.items():  # each decision used its own version's thresholds
        doc = thresholds[version]
        for d in decisions:
            assert d["threshold"] == doc["slices"].get(d["slice"], doc["default"]), d
    first_new = min(d["decided_at"] for d in by_version[new])
    last_old = max(d["decided_at"] for d in by_version[old])
    # One worker, and a batch never mixes versions: every old decision precedes every new one.
    assert last_old <= first_new
    assert first_new >= promoted_at
    in_flight = sum(1 for d in by_version[old] if d["decided_at"] > promoted_at)
    print(
        f"\nhot swap {old} -> {new}: promote() (registry + control topic ack) took "
        f"{acknowledged_at - promoted_at:.3f} s; first decision by {new} "
        f"{first_new - promoted_at:.3f} s after promotion "
        f"({first_new - acknowledged_at:.3f} s after the ack); "
        f"{in_flight} clicks (backlog) decided by {old} meanwhile; "
        f"{len(by_version[old])} + {len(by_version[new])} decisions for {len(clicks)} clicks, "
        "none missing"
    )


def test_a_pinned_worker_ignores_a_promotion(
    workers, worker_settings, trained_model, dataset, tmp_path: Path
) -> None:
    """``SLIDR_MODEL_VERSION`` pins the worker: a promotion is logged as ignored, and the
    clicks that arrive after it are still decided by the pinned version."""
    registry_path = tmp_path / "registry"
    shutil.copytree(trained_model.registry, registry_path)
    settings = worker_settings.replace(registry=registry_path)
    registry = ModelRegistry(registry_path)
    pinned = registry.active_version()
    assert pinned is not None
    new = register_copy(registry, pinned, threshold_shift=0.01)

    worker = workers.new(
        "pinned", group_id=unique("pinned"), settings=settings, SLIDR_MODEL_VERSION=pinned
    )
    worker.start()
    reader = DecisionReader(settings)
    cols = dataset.clicks
    clicks = [cols.row(i) for i in range(min(len(cols), 600))]
    before, after = clicks[:300], clicks[300:]
    producers = []
    try:
        for batch in (before, after):
            producer = PacedProducer(settings, [click_record(c) for c in batch], rate=RATE)
            producers.append(producer)
            producer.start()
            producer.finish(60)
            missing = reader.wait_for(
                [c["click_id"] for c in batch], 90, alive=lambda: worker.running
            )
            assert not missing, f"{len(missing)} clicks without a decision\n{workers.describe()}"
            if batch is before:
                promote(settings, new, reason="test: a pinned worker stays")
                deadline = time.monotonic() + 15  # the follower polls every 500 ms
                while "control: " not in worker.log_text() and time.monotonic() < deadline:
                    time.sleep(0.1)
    finally:
        for producer in producers:
            producer.stop_event.set()
        reader.close()
    log = worker.log_text()
    assert f"ignored activate '{new}'" in log and f"pinned to {pinned}" in log, log[-3000:]
    assert {d["model_version"] for d in reader.decisions} == {pinned}
