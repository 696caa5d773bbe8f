"""One error path: the project's own errors reach the user as its message only (no
traceback from Prefect's logger or ours, in the terminal and in what the Prefect UI
stores); anything else keeps its traceback and says it is a bug and where the record is."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from runtime import errors, expected_errors
from test_preflight import cli  # tests/ is on sys.path (rootdir conftest, no __init__)

# These tests log through Prefect's own loggers outside any flow run, which Prefect's API
# handler warns about; what they check is the filter, not the API handler.
pytestmark = pytest.mark.filterwarnings("ignore:Logger 'prefect")

ERRORS = [errors.DataError, errors.ConfigError, errors.DivergenceError, errors.TrackingError,
          errors.ResourceError, errors.CheckpointError]


class Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture()
def engine_logger():
    """``prefect.task_runs`` with a handler standing in for the UI's (attached to it, as
    Prefect attaches its API handler) and one for the console (on the root logger)."""
    logger, root = logging.getLogger("prefect.task_runs"), logging.getLogger()
    ui, console = Keep(), Keep()
    logger.addHandler(ui)
    root.addHandler(console)
    expected_errors.install()
    yield logger, ui, console
    logger.removeHandler(ui)
    root.removeHandler(console)


def _log_failure(logger, exc: BaseException) -> None:
    try:
        raise exc
    except BaseException:
        logger.error("Task run failed with exception: %r", exc, exc_info=True,
                     extra={"task_run_name": "load-data"})


@pytest.mark.parametrize("error", ERRORS)
def test_a_project_error_is_logged_as_its_message_only(engine_logger, error):
    logger, ui, console = engine_logger
    _log_failure(logger, error("x.npz: x_train has 1 NaN value. Fix: clean the file"))
    (record,) = ui.records
    assert record.exc_info is None and record.exc_text is None
    assert record.getMessage() == (f"load-data failed: {error.__name__}: x.npz: x_train has 1 "
                                   "NaN value. Fix: clean the file")
    assert record.levelno == logging.ERROR
    assert console.records == []  # the CLI prints it once, as "error: ..."
    assert "Traceback" not in logging.Formatter().format(record)


def test_a_project_error_raised_from_another_is_still_recognised(engine_logger):
    logger, ui, console = engine_logger
    try:
        try:
            raise OSError("disk full")
        except OSError as inner:
            raise errors.TrackingError("could not log the model") from inner
    except errors.TrackingError as exc:
        wrapped = RuntimeError("engine wrapper")
        wrapped.__cause__ = exc
    _log_failure(logger, wrapped)
    assert ui.records[0].exc_info is None and console.records == []


def test_prefects_closing_state_line_stays_out_of_the_console(engine_logger):
    logger, ui, console = engine_logger
    logger.error("Finished in state Failed('Task run encountered an exception DataError: "
                 "x.npz is bad')")
    logger.error("Finished in state Failed('Task run encountered an exception ValueError: "
                 "boom')")
    assert len(ui.records) == 2
    assert [r.getMessage() for r in console.records] == [ui.records[1].getMessage()]


def test_prefects_crash_line_for_an_interrupt_stays_out_of_the_console(engine_logger):
    """A run stopped by Ctrl-C or SIGTERM: the UI keeps Prefect's line, the console has the
    CLI's own (it said "Crash detected!" for a served run that ended CANCELLED)."""
    logger, ui, console = engine_logger
    for message in ("Execution was aborted by an interrupt signal.",
                    "Execution was aborted by a termination signal.",
                    "Execution was cancelled by the runtime environment."):
        logger.error(f"Crash detected! {message}")
    logger.error("Crash detected! Request to http://127.0.0.1:1/api failed: ConnectError.")
    assert len(ui.records) == 4
    assert [r.getMessage() for r in console.records] == [ui.records[3].getMessage()]


def test_an_unexpected_error_keeps_its_traceback(engine_logger):
    logger, ui, console = engine_logger
    _log_failure(logger, ZeroDivisionError("a bug"))
    assert ui.records[0].exc_info is not None and len(console.records) == 1
    assert "Traceback" in logging.Formatter().format(console.records[0])


def test_the_cli_calls_an_unexpected_error_a_bug_and_says_where_the_record_is(
        monkeypatch, layerwise_home, shared_data_dir):
    import cli.main
    import flows.pipeline

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli.main, "prepare_environment", lambda: None)
    monkeypatch.setattr(flows.pipeline, "run_pipeline", broken)
    result = CliRunner().invoke(cli.main.app, ["run", "--preset", "quick", "--data-dir",
                                                str(shared_data_dir), "--experiment", "bugs"])
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "ZeroDivisionError: a bug" in result.stderr
    (last,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert "this is a bug in layerwise (ZeroDivisionError)" in last
    assert f"MLflow experiment 'bugs' at sqlite:///{layerwise_home}/mlflow.db" in last


def _statuses(home: Path) -> list[str]:
    with sqlite3.connect(home / "mlflow.db") as con:
        return [s for (s,) in con.execute("SELECT status FROM runs")]


def _bad_npz(path: Path, kind: str) -> Path:
    """A file with one fault that only the data stage finds: the preflight reads every
    .npz through, so the faulty ones are tables (CSV), which it leaves to the data stage."""
    rng = np.random.default_rng(0)
    x = rng.random((300, 16), dtype=np.float32)
    if kind == "nan":
        x[3, 3] = np.nan
    y = rng.integers(0, 3, 300).astype(np.float64 if kind == "nan" else np.int64)
    if kind == "float-labels":
        y = y + 0.5
    x_test, y_test = rng.random((50, 16), dtype=np.float32), rng.integers(0, 3, 50)
    if kind == "ok":
        np.savez(path, x_train=x, y_train=y, x_test=x_test, y_test=y_test)
        return path
    import pandas as pd

    df = pd.DataFrame(np.concatenate([x, x_test]), columns=[f"f{i}" for i in range(16)])
    df["label"] = np.concatenate([y, y_test])
    df["split"] = ["train"] * len(x) + ["test"] * len(x_test)
    df.to_csv(path.with_suffix(".csv"), index=False)
    return path.with_suffix(".csv")


SMALL = ["--set", "data.n_valid=50", "--set", "data.n_train=200", "--set",
         "model.hidden_sizes=[8]", "--set", "pretrain.corruption_levels=[0.1]",
         "--set", "pretrain.epochs=1", "--set", "finetune.max_epochs=1"]


@pytest.mark.parametrize("kind,named", [
    ("nan", ["the table has 1 NaN/inf value(s), first at row 3 (line 5 of the file), "
             "column 'f3'"]),
    pytest.param("float-labels", ["has non-integer labels"], marks=pytest.mark.slow),
    pytest.param("diverge", ["pretrain/layer_1: the loss of seed 0 became non-finite",
                             "Lower pretrain.optimizer.lr"], marks=pytest.mark.slow),
])
def test_an_error_inside_the_flow_prints_the_message_only(tmp_path, kind, named):
    home = tmp_path / "home"
    path = _bad_npz(tmp_path / "bad.npz", "ok" if kind == "diverge" else kind)
    extra = (["--set", "pretrain.optimizer.lr=1e30", "--set", "pretrain.loss=squared_error"]
             if kind == "diverge" else [])
    proc = cli(home, "run", "--preset", "quick", "--dataset", str(path), *SMALL, *extra,
               timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert out.count("Traceback") == 0, out
    errors_printed = [x for x in proc.stderr.splitlines() if "error" in x.lower()]
    assert len(errors_printed) == 1 and errors_printed[0].startswith("error: "), out
    for text in named:
        assert text in errors_printed[0], out
    statuses = _statuses(home)
    assert "RUNNING" not in statuses and "FAILED" in statuses, statuses


NEVER_ANSWERS = """
import os, subprocess, sys
from runtime import ephemeral_api

def start(self):  # a guarded server that listens but never answers /api/health with 200
    self.port = ephemeral_api._free_port()
    self.process = subprocess.Popen(
        [sys.executable, "-m", "runtime.orphan_guard", str(os.getpid()), "-m", "http.server",
         str(self.port), "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    self.started = ephemeral_api.time.monotonic()

ephemeral_api._Server.start = start
sys.argv = ["layerwise", *sys.argv[1:]]
from cli.main import main
main()
"""


def test_an_ephemeral_api_that_never_answers_exits_with_one_paragraph(tmp_path,
                                                                      shared_data_dir):
    """The CLI's path with a stand-in for Prefect's server that never answers: two tries,
    then one paragraph, exit 1, nothing started in MLflow."""
    home = tmp_path / "home"
    script = tmp_path / "never_answers.py"
    script.write_text(NEVER_ANSWERS)
    proc = cli(home, "run", "--preset", "quick", "--data-dir", str(shared_data_dir),
               env={"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1",
                    "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
               script=script)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out, out
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "Prefect's temporary API server did not start" in line
    assert "within 1 s, and again on a second try" in line and "within 2 s" in line
    assert "export PREFECT_API_URL=" in line
    assert "trying once more" in proc.stderr  # the retry was made
    assert not (home / "mlflow.db").exists()  # no MLflow run, let alone a RUNNING one


