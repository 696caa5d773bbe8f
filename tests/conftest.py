"""Shared pytest fixtures."""

import os
import signal
import threading
import warnings
from pathlib import Path

import pytest


def pytest_configure(config):
    """A test run started in the background of a non-interactive shell (as CI jobs often
    are) inherits SIGINT ignored; the tests that send Ctrl-C need it delivered."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _sigint_stays_an_interrupt(request):
    """Put Ctrl-C handling back after every test. In-process code that catches an interrupt
    (Lightning sets SIGINT to SIG_IGN on KeyboardInterrupt) would otherwise leave this
    process ignoring SIGINT, and every subprocess a later test starts would inherit that:
    a Python child started with SIGINT ignored never raises KeyboardInterrupt."""
    yield
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGINT)
    if handler is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        warnings.warn(f"{request.node.nodeid} left SIGINT handled by {handler!r}; restored")


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
