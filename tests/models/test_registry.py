"""The model registry: immutable versions, the active one, activation, rollback, history."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest

from features.definitions import FEATURE_SPEC_VERSION, N_FEATURES
from models.registry import (
    GuardrailsNotPassed,
    InputWidthError,
    InvalidVersionName,
    ModelRegistry,
    ModelVersion,
    RegistryError,
    StaleActiveError,
    check_input_width,
    check_version_name,
    guardrail_verdict,
)


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


def guardrail_results(*failed: str) -> list[dict]:
    """A manifest's ``guardrails`` as run_training writes them: two that passed and
    one result per name in ``failed``."""
    results = [
        {"name": name, "passed": True, "value": 1.0, "limit": 0.5, "detail": ""}
        for name in ("min_clicks", "ivr_vs_active")
    ]
    results += [
        {"name": name, "passed": False, "value": 0.1, "limit": 0.5, "detail": f"{name} too low"}
        for name in failed
    ]
    return results


def register(registry: ModelRegistry, onnx_model: bytes, threshold: float = 0.5, **manifest) -> str:
    """Assemble a version the way run_training does and register it (its guardrails
    passed unless ``manifest`` says otherwise)."""
    staging = registry.staging_dir()
    (staging / "model.onnx").write_bytes(onnx_model)
    thresholds = {"slices": {"desktop/logged_out": threshold}, "default": 0.9, "fpr_budget": 0.02}
    (staging / "thresholds.json").write_bytes(orjson.dumps(thresholds))
    (staging / "plots").mkdir()
    (staging / "plots" / "curve.png").write_bytes(b"png")
    manifest = {
        "feature_spec_version": FEATURE_SPEC_VERSION,
        "guardrails": guardrail_results(),
        **manifest,
    }
    return registry.register(staging, manifest)


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
    assert manifest["feature_spec_version"] == FEATURE_SPEC_VERSION
    assert isinstance(manifest["registered_at"], float)


def test_activate_rollback_and_history(registry: ModelRegistry, onnx_model: bytes) -> None:
    for _ in range(3):
        register(registry, onnx_model)
    event = registry.activate("v0002", reason="better IVR")
    assert event == {
        "event": "activate",
        "version": "v0002",
        "reason": "better IVR",
        "generation": 2,  # the first registration activated v0001: generation 1
        "previous": "v0001",
    }
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


# -- names from outside are checked before any path is built ----------------------------

BAD_NAMES = (
    "/tmp/x",
    "../x",
    "v1/../../x",
    "v0001/../v0002",
    "",
    "v",
    "V0001",
    "v0001\n",
    "v０００１",  # full-width digits: str.isdigit() says yes, the pattern says no
    "v" + "1" * 500,
)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_that_is_not_a_version_is_refused_before_any_path(
    registry: ModelRegistry, onnx_model: bytes, tmp_path: Path, name: str
) -> None:
    register(registry, onnx_model)
    # A directory that would load if the name reached a path: /tmp/x-like targets exist.
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "manifest.json").write_bytes(orjson.dumps({"version": "evil"}))
    calls = [
        check_version_name,
        registry.path_of,
        registry.manifest,
        lambda v: registry.activate(v, force=True),
        lambda v: registry.rollback(to=v, force=True),
        registry.check_can_serve,
    ]
    if name:  # load("") and resolve("") mean "the active version"
        calls += [registry.load, registry.resolve]
    for call in calls:
        with pytest.raises(InvalidVersionName) as caught:
            call(name)
        assert isinstance(caught.value, RegistryError)
        message = str(caught.value)
        assert "not a version name" in message
        assert repr(name)[:30] in message, message  # the value is named ...
        assert len(message) < 300, "... but an absurdly long one is cut"
    assert registry.active_version() == "v0001"
    assert [h["event"] for h in registry.history()] == ["register", "activate"]


def test_version_names_the_registry_writes_pass(registry: ModelRegistry) -> None:
    for name in ("v0001", "v0042", "v9999", "v10000", "v123456789"):
        assert check_version_name(name) == name
    assert registry.path_of("v0007") == registry.versions_dir / "v0007"


# -- only versions whose guardrails passed are activated, unless forced ----------------


def test_guardrail_verdict_reads_the_manifest() -> None:
    assert guardrail_verdict({"guardrails": guardrail_results()}).passed
    failed = guardrail_verdict({"guardrails": guardrail_results("score_psi", "slice_fpr")})
    assert not failed.passed and failed.failed == ("score_psi", "slice_fpr")
    for manifest in ({}, {"guardrails": []}, {"guardrails": "yes"}, {"guardrails": [{"x": 1}]}):
        assert not guardrail_verdict(manifest).passed, manifest
    rejected_model = {
        "guardrails": guardrail_results(),
        "model_guardrails": {"passed": False, "failed": ["ivr_vs_active"]},
    }
    assert guardrail_verdict(rejected_model).failed == ("ivr_vs_active",)


def test_a_version_whose_guardrails_failed_is_not_activated_unless_forced(
    registry: ModelRegistry, onnx_model: bytes
) -> None:
    register(registry, onnx_model)
    rejected = register(registry, onnx_model, guardrails=guardrail_results("score_psi"))
    unchecked = register(registry, onnx_model, guardrails=None)
    for version, why in ((rejected, "score_psi"), (unchecked, "no guardrail results")):
        with pytest.raises(GuardrailsNotPassed, match=rf"{version} .*{why}.*--force"):
            registry.activate(version)
        with pytest.raises(GuardrailsNotPassed, match=why):
            registry.check_can_serve(version)
    assert registry.active_version() == "v0001"
    assert registry.active_record().generation == 1, "a refusal changes nothing"

    event = registry.activate(rejected, reason="operator knows better", force=True)
    assert event["forced"] is True and event["failed_guardrails"] == ["score_psi"]
    assert event["reason"].startswith("operator knows better [forced")
    assert "score_psi" in event["reason"]
    record = registry.active_record()
    assert (record.version, record.forced, record.previous) == (rejected, True, "v0001")
    assert registry.history()[-1]["forced"] is True
    # The worker may serve it while the registry holds it active by force, no longer after.
    assert registry.check_can_serve(rejected).failed == ("score_psi",)
    registry.activate("v0001")
    assert registry.active_record().forced is False
    with pytest.raises(GuardrailsNotPassed):
        registry.check_can_serve(rejected)
    # Forcing a version that passed records nothing special.
    assert "forced" not in registry.activate("v0001", force=True)


def test_rollback_skips_or_refuses_versions_whose_guardrails_failed(
    registry: ModelRegistry, onnx_model: bytes
) -> None:
    register(registry, onnx_model)  # v0001: passed, active
    rejected = register(registry, onnx_model, guardrails=guardrail_results("slice_fpr"))
    good = register(registry, onnx_model)
    registry.activate(rejected, force=True)
    registry.activate(good)
    assert registry.stable_versions() == ["v0001", rejected, good]
    # The newest stable version is the forced one: rollback passes over it.
    assert registry.rollback(reason="alarm")["version"] == "v0001"
    with pytest.raises(GuardrailsNotPassed, match=rf"{rejected} .*slice_fpr"):
        registry.rollback(to=rejected)
    assert registry.active_version() == "v0001"
    event = registry.rollback(to=rejected, force=True)
    assert event["version"] == rejected and event["forced"] is True


def test_the_first_version_becomes_active_only_when_its_guardrails_passed(
    registry: ModelRegistry, onnx_model: bytes
) -> None:
    register(registry, onnx_model, guardrails=guardrail_results("min_clicks"))
    assert registry.active_version() is None
    assert register(registry, onnx_model) == "v0002"
    assert registry.active_version() == "v0002"


# -- promote and rollback are compare-and-set -----------------------------------------


def test_a_change_decided_on_a_stale_active_record_is_refused(
    registry: ModelRegistry, onnx_model: bytes
) -> None:
    for _ in range(3):
        register(registry, onnx_model)
    seen = registry.active_record()  # e.g. the monitor judging v0001
    assert (seen.version, seen.generation, seen.previous) == ("v0001", 1, None)
    registry.activate("v0002", reason="retrain")  # meanwhile a retrain promotes
    with pytest.raises(StaleActiveError, match=r"expected v0001, found v0002 .*retrain"):
        registry.rollback(reason="monitor", expected_active="v0001")
    with pytest.raises(StaleActiveError, match="expected generation 1, found v0002"):
        registry.rollback(reason="monitor", expected_generation=seen.generation)
    with pytest.raises(StaleActiveError):
        registry.activate("v0003", expected_generation=seen.generation)
    assert registry.active_version() == "v0002", "the retrain's promotion stands"
    assert [h["event"] for h in registry.history()][-1] == "activate"

    now = registry.active_record()
    assert (now.version, now.generation, now.previous) == ("v0002", 2, "v0001")
    event = registry.rollback(reason="monitor", expected_active="v0002", expected_generation=2)
    assert (event["version"], event["generation"], event["previous"]) == ("v0001", 3, "v0002")


def test_concurrent_changes_on_the_same_record_have_one_winner(
    registry: ModelRegistry, onnx_model: bytes
) -> None:
    for _ in range(4):
        register(registry, onnx_model)
    seen = registry.active_record().generation
    barrier = threading.Barrier(3)
    outcomes: dict[str, str] = {}

    def attempt(version: str) -> None:
        barrier.wait()
        try:
            ModelRegistry(registry.root).activate(version, expected_generation=seen)
            outcomes[version] = "won"
        except StaleActiveError:
            outcomes[version] = "stale"

    threads = [threading.Thread(target=attempt, args=(v,)) for v in ("v0002", "v0003", "v0004")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(outcomes.values()) == ["stale", "stale", "won"], outcomes
    winner = next(v for v, o in outcomes.items() if o == "won")
    assert registry.active_record().version == winner
    assert registry.active_record().generation == seen + 1


def test_readers_never_see_a_torn_active_record(registry: ModelRegistry, onnx_model: bytes) -> None:
    register(registry, onnx_model)
    register(registry, onnx_model)
    stop = threading.Event()
    seen: list[str | None] = []
    errors: list[BaseException] = []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(registry.active_record().version)
            except BaseException as exc:  # a torn or missing state.json
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(100):
            registry.activate("v0002" if i % 2 == 0 else "v0001")
    finally:
        stop.set()
        reader.join(10)
    assert not errors, errors[:3]
    assert set(seen) <= {"v0001", "v0002"} and seen
    assert registry.active_record().generation == 101
    assert not list(registry.root.glob("*.tmp")), "no temporary file left behind"


# -- the input width is checked before a version serves ----------------------------------


def width_onnx(width: int) -> bytes:
    """A model that sums its ``width`` inputs through a sigmoid: float32 [n, width] -> [n]."""
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.full((width, 1), 0.01, dtype=np.float32), "w")
    flat = numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["s"]),
            helper.make_node("Sigmoid", ["s"], ["p"]),
            helper.make_node("Reshape", ["p", "flat"], ["score"]),
        ],
        "width",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"])],
        [weights, flat],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_model_of_another_input_width_is_refused(
    registry: ModelRegistry, onnx_model: bytes
) -> None:
    register(registry, onnx_model)
    narrow = register(registry, width_onnx(N_FEATURES - 3))
    check_input_width(registry.load("v0001"))  # this build's width: fine
    with pytest.raises(
        InputWidthError, match=rf"{narrow} takes {N_FEATURES - 3} features.*{N_FEATURES}"
    ):
        check_input_width(registry.load(narrow))
    assert isinstance(InputWidthError("x"), RegistryError)


def test_a_model_of_another_feature_spec_is_refused_at_the_same_width(
    registry: ModelRegistry, onnx_model: bytes
) -> None:
    # Same width, other values (a spec change may keep every column and change its ids).
    older = register(registry, onnx_model, feature_spec_version="f1")
    with pytest.raises(InputWidthError, match=rf"{older} was trained on feature spec f1"):
        check_input_width(registry.load(older))
    current = register(registry, onnx_model)
    check_input_width(registry.load(current))
