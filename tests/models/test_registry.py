"""The model registry: immutable versions, the active one, activation, rollback, history."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import orjson
import pytest

from features.definitions import N_FEATURES
from models.registry import ModelRegistry, ModelVersion, RegistryError


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """An untrained MLP exported to ONNX: enough to load and score."""
    from models.export import export_onnx
    from models.training import TrainConfig, mlp

    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(
        mlp(N_FEATURES, np.zeros(N_FEATURES), np.ones(N_FEATURES), TrainConfig()), N_FEATURES, path
    )
    return path.read_bytes()


def register(registry: ModelRegistry, onnx_model: bytes, threshold: float = 0.5, **manifest) -> str:
    """Assemble a version the way run_training does and register it."""
    staging = registry.staging_dir()
    (staging / "model.onnx").write_bytes(onnx_model)
    thresholds = {"slices": {"desktop/logged_out": threshold}, "default": 0.9, "fpr_budget": 0.02}
    (staging / "thresholds.json").write_bytes(orjson.dumps(thresholds))
    (staging / "plots").mkdir()
    (staging / "plots" / "curve.png").write_bytes(b"png")
    return registry.register(staging, {"feature_spec_version": "f1", **manifest})


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


def test_first_version_becomes_active_and_the_second_waits(
    registry: ModelRegistry, onnx_model: bytes
) -> None:
    assert registry.active_version() is None
    assert register(registry, onnx_model) == "v0001"
    assert registry.active_version() == "v0001"
    assert register(registry, onnx_model) == "v0002"
    assert registry.active_version() == "v0001"
    assert registry.stable_versions() == ["v0001"]
    assert [m["version"] for m in registry.versions()] == ["v0001", "v0002"]
    assert not (registry.root / "staging").exists(), "staging is cleaned up"


def test_versions_are_immutable_and_names_increase(
    registry: ModelRegistry, onnx_model: bytes
) -> None:
    names = [register(registry, onnx_model, note=str(i)) for i in range(3)]
    assert names == ["v0001", "v0002", "v0003"]
    assert names == sorted(names)
    for name in names:
        files = [p for p in registry.path_of(name).rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {
            "model.onnx",
            "manifest.json",
            "thresholds.json",
            "curve.png",
        }
        for path in files:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), f"{path} is writable"
    manifest = registry.manifest("v0002")
    assert manifest["version"] == "v0002"
    assert manifest["note"] == "1"
    assert manifest["feature_spec_version"] == "f1"
    assert isinstance(manifest["registered_at"], float)


def test_activate_rollback_and_history(registry: ModelRegistry, onnx_model: bytes) -> None:
    for _ in range(3):
        register(registry, onnx_model)
    event = registry.activate("v0002", reason="better IVR")
    assert event == {"event": "activate", "version": "v0002", "reason": "better IVR"}
    assert registry.active_version() == "v0002"
    assert registry.stable_versions() == ["v0001", "v0002"]

    # Rollback without a target: the newest stable version other than the active one.
    event = registry.rollback(reason="FPR alarm")
    assert event["event"] == "rollback" and event["version"] == "v0001"
    assert registry.active_version() == "v0001"
    assert registry.stable_versions() == ["v0001"], "the version rolled back from is not stable"

    # Rollback to a named version that never was active: the version rolled back from
    # (v0001) leaves the stable list here too.
    registry.rollback(to="v0003")
    assert registry.active_version() == "v0003"
    assert registry.stable_versions() == ["v0003"]

    history = registry.history()
    assert [(h["event"], h["version"]) for h in history] == [
        ("register", "v0001"),
        ("activate", "v0001"),
        ("register", "v0002"),
        ("register", "v0003"),
        ("activate", "v0002"),
        ("rollback", "v0001"),
        ("rollback", "v0003"),
    ]
    assert all(isinstance(h["at"], float) for h in history)
    assert history[4]["reason"] == "better IVR"
    assert history[5]["reason"] == "FPR alarm"


def test_state_survives_a_new_registry_object(registry: ModelRegistry, onnx_model: bytes) -> None:
    register(registry, onnx_model)
    register(registry, onnx_model)
    registry.activate("v0002")
    again = ModelRegistry(registry.root)
    assert again.active_version() == "v0002"
    assert again.stable_versions() == ["v0001", "v0002"]


def test_load_gives_a_scorer_and_thresholds(registry: ModelRegistry, onnx_model: bytes) -> None:
    register(registry, onnx_model, threshold=0.25)
    register(registry, onnx_model, threshold=0.75)

    model = registry.load()
    assert isinstance(model, ModelVersion)
    assert model.version == "v0001"
    assert model.thresholds == {"desktop/logged_out": 0.25}
    assert model.default_threshold == 0.9
    assert model.manifest["version"] == "v0001"
    np.testing.assert_allclose(
        model.thresholds_for(["desktop/logged_out", "tv/logged_in"]), [0.25, 0.9]
    )
    scores = model.scorer.score(np.random.default_rng(0).normal(size=(5, N_FEATURES)))
    assert scores.shape == (5,)
    assert ((scores >= 0) & (scores <= 1)).all()

    assert registry.load("v0002").thresholds == {"desktop/logged_out": 0.75}
    assert registry.load(prefer_gpu=False).version == "v0001"


def test_unknown_version_is_a_clear_error(registry: ModelRegistry, onnx_model: bytes) -> None:
    register(registry, onnx_model)
    for call in (
        lambda: registry.load("v0042"),
        lambda: registry.manifest("v0042"),
        lambda: registry.activate("v0042"),
        lambda: registry.rollback(to="v0042"),
    ):
        with pytest.raises(RegistryError, match=r"no version 'v0042' .*known: v0001"):
            call()
    assert registry.active_version() == "v0001", "a failed operation changes nothing"
    assert [h["event"] for h in registry.history()] == ["register", "activate"]


def test_empty_registry_is_a_clear_error(registry: ModelRegistry) -> None:
    assert registry.versions() == []
    assert registry.history() == []
    with pytest.raises(RegistryError, match="no active version.*slidr train"):
        registry.load()
    with pytest.raises(RegistryError, match="known: none"):
        registry.load("v0001")
    with pytest.raises(RegistryError, match="no stable version to roll back to"):
        registry.rollback()


def test_rollback_with_a_single_version_is_refused(
    registry: ModelRegistry, onnx_model: bytes
) -> None:
    register(registry, onnx_model)
    with pytest.raises(RegistryError, match="no stable version to roll back to from v0001"):
        registry.rollback()
    assert registry.active_version() == "v0001"
