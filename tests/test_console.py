"""The quiet console: what `--verbose` switches, the stage lines' way into the Prefect log,
and the MLflow and Lightning lines left out by default. Offline and fast."""

from __future__ import annotations

import logging

import pytest

from runtime import console
from runtime.expected_errors import DropMarked


@pytest.fixture()
def quiet(monkeypatch):
    for name in ("LAYERWISE_VERBOSE", "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
                 "MLFLOW_LOGGING_LEVEL", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(name, raising=False)
    console.set_verbosity(False)
    yield monkeypatch


def test_quiet_sets_the_libraries_switches_and_verbose_leaves_them(quiet):
    import os

    assert not console.verbose()
    assert os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] == "WARNING"
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    for name in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "MLFLOW_LOGGING_LEVEL",
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        quiet.delenv(name)
    console.set_verbosity(True)
    assert console.verbose() and os.environ["LAYERWISE_VERBOSE"] == "1"
    assert "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT" not in os.environ


def test_mlflow_registry_lines_are_left_out_unless_verbose(quiet, capsys):
    from mlflow.utils.logging_utils import eprint, enable_logging

    with console.mlflow_prints_quiet():
        enable_logging()  # what MLflow's log_model does inside: the filter must hold
        eprint("Successfully registered model 'm'.")
        eprint("Created version '3' of model 'm'.")
        eprint("a warning stays")
    eprint("Created version '4' of model 'm'.")  # outside: as MLflow prints it
    assert capsys.readouterr().err == "a warning stays\nCreated version '4' of model 'm'.\n"
    console.set_verbosity(True)
    with console.mlflow_prints_quiet():
        eprint("Created version '5' of model 'm'.")
    assert capsys.readouterr().err == "Created version '5' of model 'm'.\n"


def test_a_printed_stage_line_is_kept_off_the_console_handlers_only():
    record = logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 1,
                               "done  evaluate  3.0 s", None, None)
    assert DropMarked().filter(record)  # unmarked: a console handler shows it
    setattr(record, console.PRINTED, True)
    assert not DropMarked().filter(record)  # printed already: not twice


def test_announce_outside_a_flow_prints(capsys):
    console.announce("  done  load-data   0.4 s")
    console.announce("MLflow run: x", console=False)
    assert capsys.readouterr().out == "  done  load-data   0.4 s\n"


@pytest.mark.parametrize("verbose", [False, True])
def test_lightning_device_lines_only_when_verbose(verbose, caplog, monkeypatch):
    from config.stages import RuntimeConfig
    from training.trainer import make_trainer

    monkeypatch.setenv(console.VERBOSE_ENV, "1" if verbose else "0")
    with caplog.at_level(logging.INFO):
        make_trainer(RuntimeConfig(accelerator="cpu", precision="32-true"), 1)
    shown = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
             and "rank_zero" in r.name]
    assert any("GPU available" in m for m in shown) is verbose, shown
