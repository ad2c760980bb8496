"""Fixtures of the worker integration tests: a trained model registry, per-test settings.

The registry is trained once per session on a small simulation (a few seconds); every
worker test runs ``slidr worker`` subprocesses against the session's embedded stack with
topics, a Redis key prefix, a state directory and a consumer group of its own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from events.settings import Settings
from stream.engine import DecisionEngine
from tests.stream.worker_harness import WorkerPool


@dataclass(frozen=True)
class TrainedModel:
    data: Path  # clicks.parquet / purchases.parquet of the simulation
    registry: Path
    version: str


# (seed, days, clicks_per_day) tried in order: small simulations can trip a guardrail
# (e.g. a slice without human labels), which says nothing about the stream worker.
_SIMULATIONS = ((11, 3, 6000), (3, 4, 6000), (11, 4, 6000), (5, 4, 8000))


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    """A registry with one active version, trained on a ~18k-click simulation."""
    from data.simulator import simulate
    from models.pipeline import TrainOptions, run_training
    from models.registry import ModelRegistry

    root = tmp_path_factory.mktemp("worker-model")
    # No coverage minima: on a few thousand clicks a day they are often infeasible.
    options = TrainOptions(
        max_epochs=2, min_coverage=0.0, architectures=("mlp_embeddings",), peers=False
    )
    failures = []
    for seed, days, per_day in _SIMULATIONS:
        data = root / f"data-{seed}-{days}-{per_day}"
        registry = root / f"registry-{seed}-{days}-{per_day}"
        simulate(data, days=days, clicks_per_day=per_day, seed=seed)
        try:
            result = run_training(data, ModelRegistry(registry), options, progress=lambda _m: None)
        except Exception as exc:  # a guardrail or calibration refusal: try the next one
            failures.append(f"seed {seed}, {days} days: {exc}")
            continue
        return TrainedModel(data=data, registry=registry, version=result["version"])
    pytest.fail("could not train a model for the worker tests:\n" + "\n".join(failures))


@pytest.fixture
def worker_settings(stream_settings: Settings, trained_model: TrainedModel) -> Settings:
    """The test's topics on the session stack, the trained registry, its own Redis keys."""
    return stream_settings.replace(
        registry=trained_model.registry,
        redis_key_prefix=f"wt{uuid.uuid4().hex[:10]}:",
    )


@pytest.fixture
def workers(worker_settings: Settings, tmp_path: Path) -> Iterator[WorkerPool]:
    """Starts ``slidr worker`` processes for a test; stops every one of them by pid after it."""
    pool = WorkerPool(worker_settings, tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def dataset(trained_model: TrainedModel):
    """The simulation the model was trained on (clicks sorted by event time)."""
    from data.dataset import load_dataset

    return load_dataset(trained_model.data)


@pytest.fixture
def engines() -> Iterator[list[DecisionEngine]]:
    """Every engine a test builds (without Kafka, ``stream.testing``), closed after it."""
    built: list[DecisionEngine] = []
    yield built
    for engine in built:
        engine.user_state.close()
