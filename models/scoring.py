"""Scoring with ONNX Runtime: the one inference path of the worker, replay and batch scoring.

The CUDA execution provider is used when it can actually load (a GPU and its libraries
are present); otherwise the CPU provider, chosen without the error ONNX Runtime logs
when asked for CUDA on a machine without it.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from events.errors import SlidrError
from features.definitions import INDEX


class ModelFileError(SlidrError, RuntimeError):
    """The model file is missing or unreadable; the message names the path."""


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when ONNX Runtime's CUDA provider can load on this machine."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    for lib in ("libcuda.so.1", "libcudart.so.12", "libcudart.so.13"):
        try:
            ctypes.CDLL(lib)
        except OSError:
            if lib == "libcuda.so.1":
                return False  # no driver: no GPU
            continue
        if lib != "libcuda.so.1":
            return True
    return False


class OnnxScorer:
    """A loaded ONNX model: ``score(features) -> P(robot)`` as float64."""

    def __init__(self, path: Path | str, prefer_gpu: bool = True, threads: int = 1) -> None:
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"model file not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: no provider chatter on CPU machines
        providers = ["CPUExecutionProvider"]
        if prefer_gpu and cuda_usable():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelFileError(f"model file {path} cannot be loaded: {exc}") from None
        self.path = path
        self.provider = self.session.get_providers()[0]
        self.input_name = self.session.get_inputs()[0].name
        self.n_features = self.session.get_inputs()[0].shape[1]

    def score(self, features: np.ndarray) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0)
        x = np.ascontiguousarray(features, dtype=np.float32)
        (out,) = self.session.run(None, {self.input_name: x})
        return out.reshape(-1).astype(np.float64)


# Reason codes: which signals drove an invalid verdict. Thresholds are on raw counts.
REASON_RULES = (
    ("known_crawler_ua", "ua_crawler", 0.5),
    ("headless_browser", "browser_headless", 0.5),
    ("missing_user_agent", "ua_missing", 0.5),
    ("user_velocity_10s", "u_clicks_10s", 5.0),
    ("user_velocity_1m", "u_clicks_1m", 10.0),
    ("user_velocity_1h", "u_clicks_1h", 60.0),
    ("user_velocity_1d", "u_clicks_1d", 300.0),
    ("ip_velocity_1m", "ip_clicks_1m", 30.0),
    ("ip_many_users_1h", "ip_distinct_user_1h", 20.0),
    ("user_many_ips_1d", "u_distinct_ip_1d", 5.0),
)
# The rules resolved once: (code, column, limit as stored in the feature row). Counts are
# stored as float32(log1p(count)), so a count's limit is compared in that same form: expm1
# of a stored count exactly at its limit comes back a hair above it for some limits, and
# the rule would fire at the limit instead of above it.
_RULES = tuple(
    (
        code,
        INDEX[name],
        limit if name.startswith(("ua_", "browser_")) else float(np.float32(math.log1p(limit))),
    )
    for code, name, limit in REASON_RULES
)


def reason_codes(row: np.ndarray) -> list[str]:
    """Short codes explaining an invalid verdict for one feature row; ``model_score`` last."""
    reasons = [code for code, column, limit in _RULES if float(row[column]) > limit]
    reasons.append("model_score")
    return reasons


def decide(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Invalid where the robot score reaches the slice's threshold."""
    return scores >= thresholds
