"""What a run says on the console and in the Prefect flow run's logs.

Quiet by default: one line per stage plus the result. ``--verbose`` (``run``, ``ablate``,
``schedule serve``) brings back the libraries' own lines: Lightning's "GPU available:
False, used: False", "TPU available", its tips and "`Trainer.fit` stopped"; MLflow's
"Creating initial MLflow database tables", "Successfully registered model", "Created
version" and, for a tracking server, "🏃 View run ... at: ..." on every run's end (twice
for ``evaluate``, whose model logging ends it once more); Prefect's INFO lines ("Beginning
flow run", "Finished in state Completed()"). A server run printed about 50 lines, a third
of them this chatter.

The choice travels in ``LAYERWISE_VERBOSE`` (set by the CLI before Prefect or MLflow is
imported), so the flow runs that ``schedule serve`` starts in subprocesses inherit it;
``training.trainer.make_trainer`` reads it for Lightning's loggers.
Prefect's INFO records still reach the Prefect API, and the stage lines go there too
(``announce``): only the console is quiet.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

VERBOSE_ENV = "LAYERWISE_VERBOSE"
#: Marks a record whose text the console has already shown (printed by ``announce``).
PRINTED = "layerwise_printed"


def verbose() -> bool:
    """Whether the libraries' own console lines are wanted (``LAYERWISE_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false")


def set_verbosity(on: bool) -> None:
    """Choose the console for this process and the flow runs it starts; call it before
    Prefect and MLflow are imported (both read these at import).

    Args:
        on: True for ``--verbose``.
    """
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    if on:
        return
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


#: MLflow's ``eprint`` lines on registering a model; they bypass its log level.
MLFLOW_REGISTRY_LINES = ("Successfully registered model", "Created version", "Registered model")


@contextlib.contextmanager
def mlflow_prints_quiet() -> Iterator[None]:
    """Leave out MLflow's "Successfully registered model ..." and "Created version ..."
    lines unless verbose; its warnings still show. Its own switch (``disable_logging``) is
    turned back on inside ``log_model`` (its logging-and-warnings guard enables the stream
    on exit), so the lines are filtered on the stream itself."""
    from mlflow.utils.logging_utils import MLFLOW_LOGGING_STREAM as stream

    if verbose():
        yield
        return
    write, dropped = stream.write, [False]

    def filtered(text: str) -> None:
        # print() writes the line, then its "\n" on its own: drop both
        drop = text.startswith(MLFLOW_REGISTRY_LINES) or (text == "\n" and dropped[0])
        dropped[0] = drop and text != "\n"
        if not drop:
            write(text)

    stream.write = filtered
    try:
        yield
    finally:
        del stream.write  # the class's method again


def announce(line: str, console: bool = True) -> None:
    """A line for the user: printed (the CLI's one line per stage; a worker's or served
    run's output) and logged to the Prefect flow run, where the UI shows it.

    Args:
        line: The text, e.g. ``  done  pretrain-layer-1          3.2 s``.
        console: Print it too; False for the Prefect log only.
    """
    if console:
        print(line, flush=True)
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:  # a plain call outside a flow: nothing to log to
        return
    from prefect import get_run_logger

    # marked: the console handlers (runtime.expected_errors.DropMarked) leave it out
    get_run_logger().info(line.strip(), extra={PRINTED: bool(console)})
