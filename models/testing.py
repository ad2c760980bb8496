"""A model for tests, written instead of trained: a logistic regression over named
feature columns as a real registry version (ONNX graph, thresholds, manifest).

``register_logistic_model(registry, {"ua_crawler": 10.0}, bias=-5.0)`` registers, in
milliseconds, a version that flags declared crawlers (score 0.993) and passes the rest
(0.007). Writing the graph needs the ``onnx`` package (the ``train`` extra).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import orjson

from features.definitions import FEATURE_NAMES, FEATURE_SPEC_VERSION, INDEX
from models.registry import ModelRegistry

# The ONNX opset of the tiny graph; the scorer reads input and output names from the graph.
_OPSET = 17


def write_logistic_onnx(path: Path, weights: Mapping[str, float], bias: float) -> Path:
    """Write ``P(robot) = sigmoid(bias + sum(weight * column))`` as ONNX, with the
    exported models' shape: float32 [n, N_FEATURES] -> float32 [n]. ``weights`` are by
    feature name (``FEATURE_NAMES``); columns not named weigh nothing."""
    from onnx import TensorProto, checker, helper, numpy_helper

    unknown = sorted(set(weights) - set(INDEX))
    if unknown:
        raise ValueError(f"not feature columns: {unknown}")
    w = np.zeros((len(FEATURE_NAMES), 1), dtype=np.float32)
    for name, weight in weights.items():
        w[INDEX[name], 0] = weight
    initializers = [
        numpy_helper.from_array(w, "weights"),
        numpy_helper.from_array(np.array([bias], dtype=np.float32), "bias"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("MatMul", ["features", "weights"], ["weighted"]),
        helper.make_node("Add", ["weighted", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
        helper.make_node("Reshape", ["probability", "flat"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "logistic",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["clicks", len(w)])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["clicks"])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    model.ir_version = 8  # the IR of opset 17: any ONNX Runtime that runs the real models
    checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def register_logistic_model(
    registry: ModelRegistry,
    weights: Mapping[str, float],
    bias: float,
    thresholds: Mapping[str, float] | None = None,
    default_threshold: float = 0.5,
    guardrails_passed: bool = True,
) -> str:
    """Register a logistic model (see ``write_logistic_onnx``) with these per-slice
    thresholds; returns its version (the first one registered becomes active).

    Nothing was trained, so no guardrail ran: the manifest records one result, passed
    unless ``guardrails_passed`` is False, for tests of what the registry and the worker
    let become active."""
    staging = registry.staging_dir()
    write_logistic_onnx(staging / "model.onnx", weights, bias)
    (staging / "thresholds.json").write_bytes(
        orjson.dumps({"slices": dict(thresholds or {}), "default": default_threshold})
    )
    manifest = {
        "feature_spec_version": FEATURE_SPEC_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "architecture": "logistic (written by models.testing, not trained)",
        "weights": dict(weights),
        "bias": bias,
        "guardrails": [
            {
                "name": "written_for_tests",
                "passed": guardrails_passed,
                "value": None,
                "limit": None,
                "detail": "written by models.testing, not trained",
            }
        ],
    }
    return registry.register(staging, manifest)
