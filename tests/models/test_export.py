"""ONNX export: the graph's names and shapes, and scores equal to torch's for any batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from models.export import INPUT_NAME, OUTPUT_NAME, export_onnx, max_export_error
from models.scoring import OnnxScorer
from models.training import RobotClassifier, TrainConfig, mlp, predict

N = 6


@pytest.fixture(scope="module")
def model() -> RobotClassifier:
    """An untrained MLP (export must not depend on training) with a non-trivial scale."""
    rng = np.random.default_rng(3)
    mean, std = rng.normal(size=N), rng.uniform(0.5, 3.0, size=N)
    return mlp(N, mean, std, TrainConfig(seed=3))


def test_the_graph_takes_any_number_of_clicks(model: RobotClassifier, tmp_path: Path) -> None:
    path = export_onnx(model, N, tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx"
    graph = onnx.load(str(path)).graph
    onnx.checker.check_model(onnx.load(str(path)))
    (inp,), (out,) = graph.input, graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    in_dims = inp.type.tensor_type.shape.dim
    assert in_dims[0].dim_param and in_dims[1].dim_value == N  # batch axis symbolic
    assert out.type.tensor_type.shape.dim[0].dim_param
    scorer = OnnxScorer(path, prefer_gpu=False)
    assert scorer.n_features == N
    x = np.random.default_rng(4).normal(size=(300, N)).astype(np.float32) * 5
    for rows in (1, 2, 7, 300):  # exported with a batch of 2: other sizes must work too
        np.testing.assert_allclose(scorer.score(x[:rows]), predict(model, x[:rows]), atol=1e-5)


def test_the_export_error_is_measured_on_the_given_rows(
    model: RobotClassifier, tmp_path: Path
) -> None:
    path = export_onnx(model, N, tmp_path / "model.onnx")
    x = np.random.default_rng(5).normal(size=(64, N)).astype(np.float32)
    assert 0.0 <= max_export_error(model, path, x) <= 1e-5
    assert max_export_error(model, path, x[:0]) == 0.0
    # A different model in the file shows as a large error: the check can fail.
    other = mlp(N, np.zeros(N), np.ones(N), TrainConfig(seed=9))
    assert max_export_error(other, path, x) > 1e-3


def test_export_leaves_the_model_in_inference_mode(tmp_path: Path) -> None:
    model = mlp(N, np.zeros(N), np.ones(N), TrainConfig(seed=1)).train()
    export_onnx(model, N, tmp_path / "model.onnx")
    assert not model.training
