"""The run's ephemeral Prefect API server, used when no ``PREFECT_API_URL`` is configured.

Prefect starts it on the first client call (``SubprocessASGIServer``, a child process that
takes 5-7 s to answer here). A CLI run instead:

- starts it in the background as soon as the command line is validated (``prestart``), so
  its boot overlaps the ~6 s of importing torch, Lightning and MLflow; ``ready()`` waits for
  it before the flow's first Prefect call (measured: ``quick``'s start-up went from
  17.3-18.2 s to 13.9-14.2 s; README, Benchmarks);
- guards it (``runtime.orphan_guard``): it dies with the run, even under ``kill -9``;
- hands its URL to a local process pool's workers (``shared_settings``), which would
  otherwise each start a server of their own.

Nothing here applies with a configured API (a real server is nobody's child, and the
workers reach it already).
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any, Optional

_boot: Optional[threading.Thread] = None
_failure: list[BaseException] = []


def configured() -> bool:
    """True when Prefect will not start an ephemeral server (an API URL is set, or
    ephemeral servers are disabled)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return bool(PREFECT_API_URL.value()) or not PREFECT_SERVER_EPHEMERAL_ENABLED.value()


#: The second try waits this many times Prefect's startup timeout.
RETRY_FACTOR = 2


def _start() -> None:
    """Start the server; when it does not answer in time, stop it and try once more with a
    longer wait. What stops it the second time is kept for ``ready()`` to raise."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    first = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    try:
        SubprocessASGIServer().start()  # the instance Prefect's own clients use
        return
    except Exception:  # noqa: BLE001 - a slow or failed boot: one more, longer try
        SubprocessASGIServer().stop()  # the slow one, and its singleton slot
    sys.stderr.write(f"layerwise: Prefect's temporary API server did not answer within "
                     f"{first} s; trying once more with {RETRY_FACTOR * first} s\n")
    try:
        SubprocessASGIServer().start(timeout=RETRY_FACTOR * first)
    except BaseException as exc:  # noqa: BLE001 - re-raised by ready() in the main thread
        SubprocessASGIServer().stop()
        _failure.append(_startup_error(first, exc))


def _startup_error(first: int, exc: BaseException) -> BaseException:
    """One paragraph: what happened and what to do (a ``TrackingError``, printed without a
    traceback); an interrupt stays what it is."""
    from runtime.errors import TrackingError

    if not isinstance(exc, Exception):
        return exc
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return TrackingError(
        f"Prefect's temporary API server did not start: it did not answer within {first} s, "
        f"nor within {RETRY_FACTOR * first} s on a second try (load average {load:.1f} on "
        f"{os.cpu_count()} cores; {str(exc).splitlines()[0][:200]}). Nothing was trained and "
        "no MLflow run was started. Start a Prefect server once, in another terminal "
        "(`prefect server start`), and point runs at it with "
        "`export PREFECT_API_URL=http://127.0.0.1:4200/api`; or wait longer with "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600; then rerun the command.")


def prestart() -> None:
    """Guard the ephemeral server and start it in the background (no-op when configured).

    The thread is a daemon: a run that fails before ``ready()`` exits at once, and Prefect's
    ``atexit`` hook (or the guard) stops the server."""
    global _boot
    if _boot is not None or configured():
        return
    from runtime.orphan_guard import install

    install()
    _boot = threading.Thread(target=_start, name="prefect-api-boot", daemon=True)
    _boot.start()


def ready() -> None:
    """Wait for a server ``prestart`` began; raise what stopped it from answering. Must run
    before any Prefect client call: while it boots, Prefect would take it as started."""
    global _boot
    if _boot is None:
        return
    _boot.join()
    _boot = None
    if _failure:
        raise _failure.pop()


def shared_settings(local_pool: bool) -> dict[Any, Any]:
    """Prefect settings that make a local process pool's workers use this process's API.

    With no ``PREFECT_API_URL``, every spawned worker would start an ephemeral API server
    of its own (7-25 s and ~220 MB each, and a port race: six cells of a ``reversal`` run
    failed when the workers' servers lost theirs). Instead this process's server, started
    as Prefect would start it for itself, is named in the flow's settings, which the workers
    receive. Nothing changes with a configured API or a Dask cluster (whose workers may be
    on machines that cannot reach this one's loopback)."""
    ready()
    if not local_pool or configured():
        return {}
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    server = SubprocessASGIServer()
    server.start()  # at once when prestart() started it; stopped at exit, as Prefect does
    return {PREFECT_API_URL: server.api_url}
