"""MLflow calls that survive what is passing (a locked SQLite store, a dropped connection,
a 5xx) and name what is not: a full disk or a server that stopped answering becomes the
project's own error (``runtime.faults``)."""

from __future__ import annotations

import time
from typing import Any, Optional


TRANSIENT = ("database is locked", "connection", "timed out", "temporarily", "503", "502", "504")


def with_retries(fn: Any, *args: Any, attempts: int = 4, base_delay: float = 0.5, **kwargs: Any
                 ) -> Any:
    """Call ``fn``; retry errors that look transient (locks, connections, 5xx) with
    exponential backoff, then re-raise."""
    from runtime.faults import unreachable

    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - filtered by message below
            retried = "max retries exceeded" in str(exc).lower() and unreachable(exc)
            if (attempt == attempts - 1 or retried  # MLflow's HTTP client retried already
                    or not any(t in str(exc).lower() for t in TRANSIENT)):
                fault = world_fault(exc)
                if fault is not None:
                    raise fault from exc
                raise
            time.sleep(base_delay * 2**attempt)
    raise AssertionError("unreachable")


def world_fault(exc: BaseException) -> Optional[Exception]:
    """The project's error for a tracking call that failed through no fault of the code: a
    full disk or read-only store (``ResourceError``), a server that stopped answering
    (``TrackingError``); None for anything else. As the project's own errors, Prefect logs
    them without a traceback and the CLI prints their message once."""
    import mlflow

    from runtime.home import layerwise_home
    from runtime.faults import resource_error, server_error

    return resource_error(exc) or server_error(exc, mlflow.get_tracking_uri(), layerwise_home())
