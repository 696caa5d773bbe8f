"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared MNIST folder (../shared/data from the repo root; env LAYERWISE_TEST_DATA_DIR)."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    root = Path(os.environ.get("LAYERWISE_TEST_DATA_DIR", default))
    if not (root / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST raw files not found under {root} (set LAYERWISE_TEST_DATA_DIR)")
    return root


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API for the whole test session (it costs ~12-25 s to start)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def layerwise_home(tmp_path, monkeypatch) -> Path:
    """A private embedded store (MLflow SQLite, checkpoints, cached results) for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("LAYERWISE_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home
