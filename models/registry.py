"""The model registry: immutable versions on disk, and which one is active.

Layout under the registry root::

    versions/v0001/   model.onnx, manifest.json, thresholds.json, metrics.json,
                      report.html, plots/*.png   (read-only once registered)
    state.json        the active record: {"active": "v0002", "generation": 2,
                      "previous": "v0001", "forced": false, "reason": "...", "at": ...,
                      "stable": ["v0001", "v0002"]}
    history.jsonl     one line per registration, activation and rollback
    .lock             the writers' lock

Version names are what ``register`` writes: ``v`` and ASCII digits (``v0001``). Every
name that comes from outside (a flag, a control message, an environment variable) is
checked against that pattern (``check_version_name``) before any path is built from it,
so no name can reach outside ``versions/``; anything else is an ``InvalidVersionName``.

Only a version whose manifest says that every guardrail passed (``guardrail_verdict``:
a non-empty ``guardrails`` list, each ``passed``, as ``models.pipeline.run_training``
writes it) is activated, rolled back to, or made active as the first registered version.
``force=True`` overrides that for one activation; the active record and the history line
then say ``forced``, with the guardrails that failed, and the reason carries the same
note. ``stable`` lists versions that were active and not rolled back, newest last: a
rollback without a target returns to the newest stable version other than the current
one whose guardrails passed.

Compare-and-set. Every change of the active version adds one to ``generation``. A caller
that decided on what it read (the monitor judging v0003, a retrain comparing itself
with v0002) passes what it read, ``expected_active`` and/or ``expected_generation``; when
the record has moved on meanwhile the change fails with ``StaleActiveError`` and
nothing is written, instead of overwriting the newer decision. The scheme, for a registry
on a local filesystem:

- writers take an exclusive ``flock`` on ``.lock`` around read, check and write, so the
  check and the write are one step for every writer (process or thread) on the host;
- the new record is written to ``state.json.tmp``, flushed and fsynced, then renamed
  over ``state.json`` with ``os.replace`` (atomic on POSIX): readers, who take no lock,
  see the old record or the new one, never a torn one; a writer that dies mid-way leaves
  the old record and at most a stale ``.tmp``, which the next writer overwrites;
- the history line is appended under the same lock, after the rename.

``flock`` is advisory and not dependable on network filesystems: writers on several hosts
sharing one registry over NFS are not covered.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from events.errors import SlidrError
from features.definitions import FEATURE_SPEC_VERSION, N_FEATURES
from models.scoring import OnnxScorer

# ``register`` writes v0001, v0002, ...: "v" and ASCII digits, nothing else (no "/",
# no "..", no other script's digits); nine digits are more versions than anyone trains.
VERSION_NAME = re.compile(r"v[0-9]{1,9}")


class RegistryError(SlidrError, RuntimeError):
    """A registry operation that cannot be done; the message says why."""


class InvalidVersionName(RegistryError):
    """A version name that the registry would never write (a path, empty, too long)."""


class GuardrailsNotPassed(RegistryError):
    """The version's manifest does not say that its guardrails passed."""


class StaleActiveError(RegistryError):
    """The active record moved on after the caller read it; nothing was changed."""


class InputWidthError(RegistryError):
    """The model takes other features than this build computes (another number, or
    another feature spec)."""


def _shown(value: object, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters (with the full length) when longer."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, str | bytes) else len(text)
    return f"{text[:limit]}... ({size} characters)"


def check_version_name(version: object) -> str:
    """``version`` when it is a name ``register`` writes (``v0001``), else
    ``InvalidVersionName`` naming the value."""
    if isinstance(version, str) and VERSION_NAME.fullmatch(version):
        return version
    raise InvalidVersionName(
        f"not a version name: {_shown(version)} (expected v and digits, e.g. v0001)"
    )


@dataclass(frozen=True)
class GuardrailVerdict:
    """Whether a version's manifest says its guardrails passed; ``failed`` names those
    that did not (or why there is no verdict)."""

    passed: bool
    failed: tuple[str, ...] = ()

    def describe(self) -> str:
        return "passed" if self.passed else "failed: " + ", ".join(self.failed)


def guardrail_verdict(manifest: dict) -> GuardrailVerdict:
    """Read the guardrail results ``run_training`` stores in a manifest (``guardrails``:
    data guardrails and, for a retrain, the model guardrails). A manifest without
    results has not passed: nothing vouches for it."""
    results = manifest.get("guardrails")
    if not isinstance(results, list) or not results:
        return GuardrailVerdict(False, ("no guardrail results in the manifest",))
    failed = [
        str(r.get("name", "unnamed")) if isinstance(r, dict) else _shown(r)
        for r in results
        if not (isinstance(r, dict) and r.get("passed") is True)
    ]
    model = manifest.get("model_guardrails")
    if not failed and isinstance(model, dict) and model.get("passed") is False:
        failed = [str(name) for name in model.get("failed") or ["model guardrails"]]
    return GuardrailVerdict(not failed, tuple(failed))


@dataclass(frozen=True)
class ActiveRecord:
    """``state.json``: which version is active, and how it came to be."""

    version: str | None
    generation: int  # one more for every activation and rollback
    previous: str | None  # the version active before
    forced: bool  # activated with force=True although its guardrails did not pass
    reason: str
    at: float  # epoch seconds of the change (0.0: none yet)


def _write_json(path: Path, value: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        handle.flush()
        os.fsync(handle.fileno())
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


def check_input_width(model: ModelVersion, width: int = N_FEATURES) -> None:
    """Raise ``InputWidthError`` unless ``model`` was trained on this build's feature
    spec (when its manifest names one) and scores rows of ``width`` features (this
    build's feature vector by default) into one score each.

    The graph's declared input shape is compared first; a trial row of zeros then
    catches a graph whose width is symbolic or whose output does not fit.
    """
    spec = model.manifest.get("feature_spec_version")
    if spec is not None and spec != FEATURE_SPEC_VERSION:
        # The width may match while the values differ (a change of hash buckets keeps
        # every column): such a version would score every click, wrongly.
        raise InputWidthError(
            f"{model.version} was trained on feature spec {spec}; this build computes "
            f"{FEATURE_SPEC_VERSION}: train a version with this build"
        )
    declared = model.scorer.n_features
    if isinstance(declared, int) and declared != width:
        raise InputWidthError(
            f"{model.version} takes {declared} features per click; this build computes "
            f"{width} (feature spec {FEATURE_SPEC_VERSION}; the version's: {spec or 'unknown'})"
        )
    try:
        scores = model.scorer.score(np.zeros((1, width), dtype=np.float32))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise InputWidthError(
            f"{model.version} cannot score a row of {width} features (feature spec "
            f"{FEATURE_SPEC_VERSION}): {exc}"
        ) from None
    if scores.shape != (1,):
        raise InputWidthError(
            f"{model.version} gives {scores.shape} scores for one row of {width} features"
        )


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
        state = orjson.loads(path.read_bytes()) if path.exists() else {}
        # Registries written before the compare-and-set lack the newer keys.
        defaults: dict[str, object] = {
            "active": None,
            "stable": [],
            "generation": 0,
            "previous": None,
            "forced": False,
            "reason": "",
            "at": 0.0,
        }
        return {**defaults, **state}

    def _log(self, event: dict) -> None:
        with (self.root / "history.jsonl").open("ab") as handle:
            handle.write(orjson.dumps({"at": time.time(), **event}) + b"\n")

    def staging_dir(self) -> Path:
        """A fresh directory to assemble a version in before ``register``."""
        path = self.root / "staging" / f"{os.getpid()}-{time.time_ns()}"
        path.mkdir(parents=True)
        return path

    def register(self, staging: Path, manifest: dict, activate_first: bool = True) -> str:
        """Move an assembled version into the registry under the next version name.

        With ``activate_first`` the version becomes active when none is yet and its
        manifest says its guardrails passed.
        """
        with self._lock():
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            numbers = [int(p.name[1:]) for p in self._version_dirs()]
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
            if activate_first and state["active"] is None and guardrail_verdict(manifest).passed:
                self._set_active(state, version, "first registered version", "activate")
        with contextlib.suppress(OSError):  # only succeeds once no other staging is left
            (self.root / "staging").rmdir()
        return version

    def _set_active(
        self,
        state: dict,
        version: str,
        reason: str,
        action: str,
        overridden: GuardrailVerdict | None = None,
    ) -> dict:
        """Write the new active record (the caller holds the lock); returns the history
        event. ``overridden``: the failed verdict that ``force`` overrode."""
        if overridden is not None:
            reason = f"{reason} [forced: guardrails {overridden.describe()}]"
        event: dict = {
            "event": action,
            "version": version,
            "reason": reason,
            "generation": int(state["generation"]) + 1,
            "previous": state["active"],
        }
        if overridden is not None:
            event.update(forced=True, failed_guardrails=list(overridden.failed))
        if action == "activate":
            state["stable"] = [v for v in state["stable"] if v != version] + [version]
        state.update(
            active=version,
            generation=event["generation"],
            previous=state["active"],
            forced=overridden is not None,
            reason=reason,
            at=time.time(),
        )
        _write_json(self.root / "state.json", state)
        self._log(event)
        return event

    def _version_dirs(self) -> list[Path]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(
            (p for p in self.versions_dir.iterdir() if VERSION_NAME.fullmatch(p.name)),
            key=lambda p: int(p.name[1:]),
        )

    def versions(self) -> list[dict]:
        """Manifests of every registered version, oldest first."""
        out = []
        for path in self._version_dirs():
            manifest = path / "manifest.json"
            if manifest.exists():
                out.append(orjson.loads(manifest.read_bytes()))
        return out

    def manifest(self, version: str) -> dict:
        path = self.path_of(version) / "manifest.json"
        if not path.exists():
            known = ", ".join(m["version"] for m in self.versions()) or "none"
            raise RegistryError(f"no version {version!r} in {self.root} (known: {known})")
        return orjson.loads(path.read_bytes())

    def verdict(self, version: str) -> GuardrailVerdict:
        """What ``version``'s manifest says of its guardrails."""
        return guardrail_verdict(self.manifest(version))

    def active_record(self) -> ActiveRecord:
        """The active record as it is now (read without the lock: see the module notes)."""
        state = self._state()
        return ActiveRecord(
            version=state["active"],
            generation=int(state["generation"]),
            previous=state["previous"],
            forced=bool(state["forced"]),
            reason=str(state["reason"]),
            at=float(state["at"]),
        )

    def active_version(self) -> str | None:
        return self._state()["active"]

    def stable_versions(self) -> list[str]:
        return list(self._state()["stable"])

    def _check_expected(
        self, state: dict, expected_active: str | None, expected_generation: int | None
    ) -> None:
        current, generation = state["active"], int(state["generation"])
        if (expected_active is not None and expected_active != current) or (
            expected_generation is not None and expected_generation != generation
        ):
            if expected_active is None:
                seen = f"generation {expected_generation}"
            elif expected_generation is None:
                seen = expected_active
            else:
                seen = f"{expected_active} (generation {expected_generation})"
            raise StaleActiveError(
                f"the active record moved on: expected {seen}, found {current} "
                f"(generation {generation}: {state['reason'] or 'no reason'}); nothing changed"
            )

    def _activatable(self, version: str, force: bool) -> GuardrailVerdict | None:
        """None when ``version`` may become active; its failed verdict when only
        ``force`` lets it. Raises ``GuardrailsNotPassed`` otherwise."""
        verdict = self.verdict(version)
        if verdict.passed:
            return None
        if force:
            return verdict
        raise GuardrailsNotPassed(
            f"{version} cannot be activated: its guardrails did not pass "
            f"({verdict.describe()}); `slidr promote {version} --force` activates it anyway, "
            "and the registry records that it was forced"
        )

    def activate(
        self,
        version: str,
        reason: str = "promoted",
        *,
        force: bool = False,
        expected_active: str | None = None,
        expected_generation: int | None = None,
    ) -> dict:
        """Make ``version`` the active one; returns the history event.

        Refused (``GuardrailsNotPassed``) when its guardrails did not pass, unless
        ``force``; refused (``StaleActiveError``) when ``expected_active`` /
        ``expected_generation`` no longer describe the active record.
        """
        check_version_name(version)
        with self._lock():
            state = self._state()
            self._check_expected(state, expected_active, expected_generation)
            overridden = self._activatable(version, force)
            return self._set_active(state, version, reason, "activate", overridden)

    def rollback(
        self,
        to: str | None = None,
        reason: str = "manual rollback",
        *,
        force: bool = False,
        expected_active: str | None = None,
        expected_generation: int | None = None,
    ) -> dict:
        """Return to ``to``, or to the newest stable version before the active one whose
        guardrails passed (any stable one with ``force``).

        The version rolled back from leaves the stable list. ``force`` and the
        expectations as for ``activate``.
        """
        if to is not None:
            check_version_name(to)
        with self._lock():
            state = self._state()
            self._check_expected(state, expected_active, expected_generation)
            current = state["active"]
            stable = [v for v in state["stable"] if v != current]
            if to is not None:
                target = to
            else:
                candidates = [v for v in reversed(stable) if force or self.verdict(v).passed]
                if not candidates:
                    skipped = f" (guardrails failed: {', '.join(stable)})" if stable else ""
                    raise RegistryError(
                        f"no stable version to roll back to from {current}{skipped}"
                    )
                target = candidates[0]
            overridden = self._activatable(target, force)
            state["stable"] = stable if target in stable else stable + [target]
            return self._set_active(state, target, reason, "rollback", overridden)

    def check_can_serve(self, version: str) -> GuardrailVerdict:
        """What a worker asks before switching to ``version``: its guardrails passed, or
        the registry holds it active by a forced activation. Returns the verdict;
        raises ``GuardrailsNotPassed`` (or another ``RegistryError``) otherwise."""
        check_version_name(version)
        verdict = self.verdict(version)
        if verdict.passed:
            return verdict
        record = self.active_record()
        if record.version == version and record.forced:
            return verdict
        raise GuardrailsNotPassed(
            f"{version} did not pass its guardrails ({verdict.describe()}) and the "
            f"registry does not hold it active by force (active: {record.version})"
        )

    def history(self) -> list[dict]:
        path = self.root / "history.jsonl"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]

    def path_of(self, version: str) -> Path:
        """The version's directory; the name is checked first, so it stays under
        ``versions/``."""
        return self.versions_dir / check_version_name(version)

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
