"""What every ``layerwise`` command shares: the error line and exit codes, the embedded
Prefect environment, signal handling and the guard around a command's work.

It imports typer only at module level and no command module, so every command can import
it (``cli.main``, ``cli.ablate``, ``cli.registry``, ``cli.schedule``).

Exit codes: 2 for a mistake on the command line or in the config (found before any work),
1 for a failure while working, 130 for Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from typing import Callable, Iterator, NoReturn, Optional

import typer


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: <message>`` to stderr and exit with ``code``.

    Args:
        message: What is wrong and how to fix it (one paragraph).
        code: The exit status.
    """
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def prepare_environment() -> None:
    """Embedded defaults for Prefect, set before it is imported; with no Prefect API
    configured, its ephemeral server starts now, in the background, and dies with this
    process (``runtime.ephemeral_api``). The console's verbosity is set before this
    (``runtime.console.set_verbosity``); Prefect's INFO records reach its API either way."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    # Prefect's 20 s default was too short for eight runs starting their ephemeral servers
    # at once on 2 busy cores (one timed out: "Timed out while attempting to connect").
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from runtime.ephemeral_api import prestart

    prestart()


def interrupts_on_signals() -> Callable[[], None]:
    """SIGTERM ends a run like Ctrl-C: MLflow runs are marked KILLED, exit is non-zero.

    Both are remembered (``runtime.interrupts.note_interrupt``), so one that Python swallows is
    raised again at the next chunk of training. Only the first is raised: a second Ctrl-C
    while Prefect and MLflow record the runs' end left the flow run "Running" in Prefect;
    it now only says that the run is already stopping.

    Returns:
        A function that restores the previous handlers (for callers in the same process,
        such as tests).
    """
    from runtime.interrupts import note_interrupt

    stopping = []

    def handler(signum, frame):  # noqa: ARG001
        if stopping:  # a second Ctrl-C while the runs' end is recorded would cut it short
            sys.stderr.write("layerwise: already stopping (recording the runs' end, a few "
                             "seconds); Ctrl-\\ quits at once\n")
            return
        stopping.append(signum)
        raise note_interrupt(f"signal {signum}")

    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int is signal.default_int_handler:  # not when SIGINT is ignored
        signal.signal(signal.SIGINT, handler)
    previous_term = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous_term)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, previous_int)

    return restore


@contextlib.contextmanager
def guarded_work(resume_hint: str, record: str, tracking_uri: Optional[str] = None
                 ) -> Iterator[None]:
    """The one error path around a command's work (training, serving).

    - the project's own errors (``runtime.errors.LayerwiseError``) print their message only
      and exit 1;
    - Ctrl-C or SIGTERM exits 130 saying the MLflow runs were marked KILLED;
    - a fault of the world (a full disk, no memory, a server that stopped answering:
      ``runtime.faults``) prints what ran out or stopped and how to resume, exit 1;
    - anything else is a bug: its traceback, then one line saying so and where the run's
      record is, exit 1.

    Args:
        resume_hint: How to resume after an interrupt, e.g. "Rerun the same command ...".
        record: Where the run's record is, e.g. "MLflow experiment 'x' at sqlite:///...".
        tracking_uri: The run's MLflow tracking URI (default: the embedded store's).
    """
    from runtime.errors import LayerwiseError

    restore = interrupts_on_signals()
    try:
        yield
    except typer.Exit:
        raise
    except LayerwiseError as exc:
        fail(str(exc), code=1)
    except BaseException as exc:
        from runtime.home import layerwise_home
        from runtime.faults import resource_error, server_error
        from tracking.tracker import default_tracking_uri, is_interrupt

        if is_interrupt(exc):
            fail(f"interrupted; the MLflow runs were marked KILLED. {resume_hint}", code=130)
        fault = (resource_error(exc)
                 or server_error(exc, tracking_uri or default_tracking_uri(), layerwise_home()))
        if fault is not None:  # the world's fault, not the code's: no traceback
            fail(str(fault), code=1)
        traceback.print_exc(file=sys.stderr)
        fail(f"this is a bug in layerwise ({type(exc).__name__}), not a mistake in your "
             f"input: please report it with the traceback above. The run's record: {record} "
             "(its runs are marked FAILED).", code=1)
    finally:
        restore()


def guarded_call(fn: Callable, *args, code: int = 1, **kwargs):
    """Call ``fn``; a ``LayerwiseError`` it raises becomes ``error: ...`` and exit ``code``.

    Args:
        fn: The function to call.
        code: The exit status on a ``LayerwiseError``.
    """
    from runtime.errors import LayerwiseError

    try:
        return fn(*args, **kwargs)
    except LayerwiseError as exc:
        fail(str(exc), code=code)
