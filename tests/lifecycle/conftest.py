"""The lifecycle tests run workers too: they share the stream tests' fixtures."""

from tests.stream.conftest import dataset, trained_model, worker_settings, workers  # noqa: F401
