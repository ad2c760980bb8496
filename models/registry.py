"""The model registry: immutable versions on disk, and which one is active.

Layout under the registry root::

    versions/v0001/   model.onnx, manifest.json, thresholds.json, metrics.json,
                      report.html, plots/*.png   (read-only once registered)
    state.json        {"active": "v0001", "stable": ["v0001"]}
    history.jsonl     one line per registration, activation and rollback

The first registered version becomes active; later ones wait for ``slidr promote``.
``stable`` lists versions that were active and not rolled back, newest last: rollback
returns to the newest stable version other than the current one.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from events.errors import SlidrError
from models.scoring import OnnxScorer


class RegistryError(SlidrError, RuntimeError):
    """A registry operation that cannot be done; the message says why."""


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    os.replace(tmp, path)


@dataclass
class ModelVersion:
    """A loaded version: the ONNX scorer and the per-slice thresholds."""

    version: str
    scorer: OnnxScorer
    thresholds: dict[str, float]
    default_threshold: float
    manifest: dict

    def thresholds_for(self, slices: list[str] | np.ndarray) -> np.ndarray:
        get = self.thresholds.get
        default = self.default_threshold
        return np.array([get(s, default) for s in slices], dtype=np.float64)


class ModelRegistry:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _state(self) -> dict:
        path = self.root / "state.json"
        return orjson.loads(path.read_bytes()) if path.exists() else {"active": None, "stable": []}

    def _log(self, event: dict) -> None:
        with (self.root / "history.jsonl").open("ab") as handle:
            handle.write(orjson.dumps({"at": time.time(), **event}) + b"\n")

    def staging_dir(self) -> Path:
        """A fresh directory to assemble a version in before ``register``."""
        path = self.root / "staging" / f"{os.getpid()}-{time.time_ns()}"
        path.mkdir(parents=True)
        return path

    def register(self, staging: Path, manifest: dict, activate_first: bool = True) -> str:
        """Move an assembled version into the registry under the next version name."""
        with self._lock():
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            numbers = [
                int(p.name[1:]) for p in self.versions_dir.glob("v[0-9]*") if p.name[1:].isdigit()
            ]
            version = f"v{max(numbers, default=0) + 1:04d}"
            manifest = {**manifest, "version": version, "registered_at": time.time()}
            _write_json(staging / "manifest.json", manifest)
            target = self.versions_dir / version
            os.replace(staging, target)
            for path in target.rglob("*"):
                if path.is_file():
                    path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            self._log({"event": "register", "version": version})
            state = self._state()
            if activate_first and state["active"] is None:
                self._set_active(state, version, "first registered version", "activate")
        with contextlib.suppress(OSError):  # only succeeds once no other staging is left
            (self.root / "staging").rmdir()
        return version

    def _set_active(self, state: dict, version: str, reason: str, action: str) -> dict:
        state["active"] = version
        if action == "activate":
            state["stable"] = [v for v in state["stable"] if v != version] + [version]
        _write_json(self.root / "state.json", state)
        event = {"event": action, "version": version, "reason": reason}
        self._log(event)
        return event

    def versions(self) -> list[dict]:
        """Manifests of every registered version, oldest first."""
        out = []
        for path in sorted(self.versions_dir.glob("v[0-9]*")):
            manifest = path / "manifest.json"
            if manifest.exists():
                out.append(orjson.loads(manifest.read_bytes()))
        return out

    def manifest(self, version: str) -> dict:
        path = self.versions_dir / version / "manifest.json"
        if not path.exists():
            known = ", ".join(m["version"] for m in self.versions()) or "none"
            raise RegistryError(f"no version {version!r} in {self.root} (known: {known})")
        return orjson.loads(path.read_bytes())

    def active_version(self) -> str | None:
        return self._state()["active"]

    def stable_versions(self) -> list[str]:
        return list(self._state()["stable"])

    def activate(self, version: str, reason: str = "promoted") -> dict:
        """Make ``version`` the active one; returns the history event."""
        self.manifest(version)
        with self._lock():
            return self._set_active(self._state(), version, reason, "activate")

    def rollback(self, to: str | None = None, reason: str = "manual rollback") -> dict:
        """Return to ``to``, or to the newest stable version before the active one.

        The version rolled back from leaves the stable list.
        """
        with self._lock():
            state = self._state()
            current = state["active"]
            stable = [v for v in state["stable"] if v != current]
            target = to or (stable[-1] if stable else None)
            if target is None:
                raise RegistryError(f"no stable version to roll back to from {current}")
            self.manifest(target)
            state["stable"] = stable if target in stable else stable + [target]
            return self._set_active(state, target, reason, "rollback")

    def history(self) -> list[dict]:
        path = self.root / "history.jsonl"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]

    def path_of(self, version: str) -> Path:
        return self.versions_dir / version

    def resolve(self, version: str | None) -> str:
        """``version`` when given, else the active one (a clear error when there is none)."""
        if version:
            self.manifest(version)
            return version
        active = self.active_version()
        if active is None:
            raise RegistryError(
                f"registry {self.root} has no active version (train one with `slidr train`)"
            )
        return active

    def load(self, version: str | None = None, prefer_gpu: bool = True) -> ModelVersion:
        """Load a version (default: the active one) for scoring."""
        version = self.resolve(version)
        folder = self.path_of(version)
        thresholds = orjson.loads((folder / "thresholds.json").read_bytes())
        return ModelVersion(
            version=version,
            scorer=OnnxScorer(folder / "model.onnx", prefer_gpu=prefer_gpu),
            thresholds={k: float(v) for k, v in thresholds["slices"].items()},
            default_threshold=float(thresholds["default"]),
            manifest=self.manifest(version),
        )
