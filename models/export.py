"""ONNX export of a trained classifier, checked against torch."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.training import fuse, predict

INPUT_NAME = "features"
OUTPUT_NAME = "score"
OPSET = 17


def export_onnx(model: nn.Module, n_features: int, path: Path) -> Path:
    """Write ``model`` as ONNX: float32 [n, n_features] -> P(robot) float32 [n].

    Averaged cross-fitted members are written as one batched network (``fuse``); check
    the file against the unfused model with ``max_export_error``."""
    model = fuse(model).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, which needs
        # onnxscript; for a three-layer MLP both give the same graph.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(2, n_features),),
            # The TorchScript exporter writes to a file object too; torch's annotation
            # names paths only.
            buffer,  # type: ignore[arg-type]
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "clicks"}, OUTPUT_NAME: {0: "clicks"}},
            opset_version=OPSET,
            dynamo=False,
        )
    path.write_bytes(buffer.getvalue())
    return path


def max_export_error(model: nn.Module, onnx_path: Path, x: np.ndarray) -> float:
    """Largest absolute difference between torch and ONNX Runtime scores on ``x``."""
    from models.scoring import OnnxScorer

    scorer = OnnxScorer(onnx_path, prefer_gpu=False)
    return float(np.max(np.abs(scorer.score(x) - predict(model, x)))) if len(x) else 0.0
