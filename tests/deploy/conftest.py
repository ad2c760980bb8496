"""The worker fixtures of tests/stream (a trained registry, per-test settings, a pool of
``slidr worker`` processes), for the test that scrapes a running worker."""

from tests.stream.conftest import dataset, trained_model, worker_settings, workers

__all__ = ["dataset", "trained_model", "worker_settings", "workers"]
