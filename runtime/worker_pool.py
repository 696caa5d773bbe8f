"""A local process pool for ablations whose running tasks stop when the run stops.

Prefect's ``ProcessPoolTaskRunner`` waits, on leaving, for every task its workers run; it
cannot cancel one once started (its cancel event is checked only by thread-pool tasks). A
run stopped by SIGTERM (``kill PID``, a service manager), by a SIGINT sent to it alone, or by
an error therefore waited until its workers' tasks ended: measured, 22 s for the `tiny`
grid, and a `tutorial` cell is hours. A terminal's Ctrl-C, which reaches the workers too,
hung for ever: see ``stops_with_the_run``.

``StoppingProcessPool`` sets an event its workers watch (``runtime.orphan_guard``) before
it leaves: a busy worker's task stops at its next batch of training, and a task the pool had
already queued does not start (``runtime.orphan_guard.stop_requested``).

An interrupted task must end as an ``Exception`` (``stops_with_the_run``): Prefect's pool
completes a task's future only when the task returns or raises an ``Exception``
(``_ChainedFuture``), so a task ended by ``KeyboardInterrupt`` left every task that depends
on it, and the pool's shutdown, waiting for ever. It is not retried
(``retry_unless_stopping``)."""

from __future__ import annotations

import functools
import multiprocessing
import os
from typing import Any, Callable, TypeVar

from prefect.task_runners import ProcessPoolTaskRunner

from runtime.orphan_guard import watch_parent

F = TypeVar("F", bound=Callable[..., Any])


class RunStopping(Exception):
    """A pool worker's task, stopped because its run stops (Ctrl-C, SIGTERM, an error)."""


def stops_with_the_run(fn: F) -> F:
    """A task function whose interrupt (``KeyboardInterrupt``) ends it as ``RunStopping``."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise RunStopping(f"stopped: {exc or 'interrupted'}") from None

    return run  # type: ignore[return-value]


def retry_unless_stopping(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed task unless its run is stopping."""
    return not isinstance(state.data, RunStopping)


class StoppingProcessPool(ProcessPoolTaskRunner):
    """A process pool whose workers die with the run (even under kill -9) and whose tasks
    stop when the run leaves it (``runtime.orphan_guard.watch_parent``)."""

    def __init__(self, max_workers: int):
        super().__init__(max_workers=max_workers, initializer=watch_parent)
        self._stop: Any = None

    def __enter__(self) -> "StoppingProcessPool":
        # Prefect enters a duplicate (``duplicate`` copies the initializer and its
        # arguments): each entry gets the event its own workers watch.
        self._stop = multiprocessing.get_context("spawn").Event()
        self._initializer, self._initargs = watch_parent, (os.getpid(), self._stop)
        return super().__enter__()

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if self._stop is not None:  # after a normal end every worker is idle: a no-op
            self._stop.set()
        super().__exit__(exc_type, exc_value, traceback)
