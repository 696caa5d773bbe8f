"""Prefect's log records of the project's own errors, without their tracebacks.

Prefect's task and flow engines log a failed run's exception with ``exc_info=True``
(``prefect.task_runs``: "Task run failed with exception: ..."; ``prefect.flow_runs``:
"Encountered exception during execution: ..."), and the console shows that traceback
before the CLI's own ``error:`` line. For a ``runtime.errors.LayerwiseError`` (an error the
project raises on purpose, whose message names the fix) a filter on those two loggers:

- drops the traceback and rewrites the record to the project's message, which the Prefect
  UI's log handler (attached to those loggers) then stores as one clean ERROR line;
- marks it, so the console handlers, which get it by propagation, leave it out: the CLI
  prints the same message once, as ``error: ...``;
- marks Prefect's closing "Finished in state Failed(... DataError: ...)" lines the same
  way (kept in the UI, left out of the console), and its "Crash detected!" line for a run
  stopped by Ctrl-C or SIGTERM, which the CLI reports itself;
- keeps the traceback at DEBUG level, on ``layerwise.errors``, for whoever asks for it.

Any other exception is left alone: its traceback is how a bug gets fixed.
"""

from __future__ import annotations

import logging
import re
from typing import Optional

from runtime.console import PRINTED

ENGINE_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
_MARK = "layerwise_expected"
#: Prefect's closing line of a failed run: "Finished in state Failed('Task run encountered
#: an exception DataError: ...')" (flow runs: "... an exception: DataError: ...").
_FAILED_STATE = re.compile(r"encountered an exception:? (\w+):")
#: Prefect's line for a run stopped by Ctrl-C or SIGTERM ("Crash detected! Execution was
#: aborted by an interrupt signal."): kept in the UI, not printed, since the CLI says once
#: that the run was interrupted and how to resume.
_INTERRUPTED = re.compile(r"^Crash detected! Execution was (aborted by an interrupt signal|"
                          r"aborted by a termination signal|cancelled by the runtime)")
debug_log = logging.getLogger("layerwise.errors")


def _error_names() -> set[str]:
    """Names of ``LayerwiseError`` and all its subclasses."""
    from runtime.errors import LayerwiseError

    names, todo = set(), [LayerwiseError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def expected_error(record: logging.LogRecord) -> Optional[BaseException]:
    """The ``LayerwiseError`` a record carries (its exception or one it was raised from)."""
    from runtime.errors import LayerwiseError

    exc = record.exc_info[1] if record.exc_info else None
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, LayerwiseError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class ExpectedErrorFilter(logging.Filter):
    """On the engine loggers: strip the traceback of an expected error and mark the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = expected_error(record)
        if exc is None:
            # The run's closing state line repeats the message: the UI keeps it, the
            # console (where the CLI prints it) does not.
            found = record.exc_info is None and _FAILED_STATE.search(str(record.msg))
            if (found and found.group(1) in _error_names()) or _INTERRUPTED.match(
                    str(record.msg)):
                setattr(record, _MARK, True)
            return True
        debug_log.debug("%s", exc, exc_info=record.exc_info)
        where = record.__dict__.get("task_run_name") or record.__dict__.get("flow_run_name")
        record.msg = f"{where + ' failed: ' if where else ''}{type(exc).__name__}: {exc}"
        record.args, record.exc_info, record.exc_text = (), None, None
        setattr(record, _MARK, True)
        return True


class DropMarked(logging.Filter):
    """On console handlers: leave out what the CLI prints itself (the expected errors, and
    the stage lines that ``runtime.console.announce`` printed before logging them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(record, _MARK, False) or getattr(record, PRINTED, False))


def install() -> None:
    """Add the filters (once) to the engine loggers and to the handlers of the root and
    ``prefect`` loggers (where Prefect's console handler lives). Call after Prefect has
    configured logging (importing ``prefect`` does)."""
    for name in ENGINE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, ExpectedErrorFilter) for f in logger.filters):
            logger.addFilter(ExpectedErrorFilter())
    for logger in (logging.getLogger(), logging.getLogger("prefect")):
        for handler in logger.handlers:
            if not any(isinstance(f, DropMarked) for f in handler.filters):
                handler.addFilter(DropMarked())
