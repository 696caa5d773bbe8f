"""The run's ephemeral Prefect API server, used when no ``PREFECT_API_URL`` is configured.

Left to itself, Prefect starts one on its first client call (``SubprocessASGIServer``): it
imports its whole server (FastAPI, the database models: seconds of imports) into the run's own
process just to start a child process that imports it again. A CLI run instead:

- starts the same server command itself (``prestart``), as soon as the command line is
  validated, without importing Prefect's server: the child boots on the other core while
  this process imports torch, Lightning and MLflow, and ``ready()`` waits for it before the
  flow's first Prefect call (what that saves: docs/benchmarks.md, "Start-up and exit");
- then points this process's Prefect settings at it (``PREFECT_API_URL`` in the
  environment, Prefect's global settings refreshed), so every client of the run uses it,
  and a local process pool's workers, who inherit the environment, do too instead of each
  starting a server of its own;
- guards it (``runtime.orphan_guard``): it dies with the run, even under ``kill -9``; and
  stops it at exit, as Prefect does.

Nothing here applies with a configured API (a real server is nobody's child, and the
workers reach it already).
"""

from __future__ import annotations

import atexit
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, Optional

#: Prefect's ephemeral servers pick a free port in this range.
PORTS = range(8000, 9000)
#: The second try waits this many times Prefect's startup timeout.
RETRY_FACTOR = 2
#: uvicorn's exit status when the server could not start; Prefect takes it for a port taken
#: meanwhile and retries on another port, as ``_Server.wait`` does, a bounded number of times.
PORT_TAKEN = 3
MAX_RESTARTS = 3
#: Health checks go straight to the loopback server, never through an HTTP proxy from the
#: environment.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Server:
    """One guarded ``uvicorn`` running Prefect's server app, as ``SubprocessASGIServer``
    runs it (the same command and environment)."""

    def __init__(self) -> None:
        self.process: Optional[subprocess.Popen[Any]] = None
        self.port = 0
        self.started = 0.0
        self.stopping = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, port: int = 0) -> None:
        """Start the server on ``port`` (0: a free one)."""
        import prefect
        from prefect.settings import get_current_settings

        self.port = port or _free_port()
        self.stopping = False
        command = [sys.executable, "-m", "runtime.orphan_guard", str(os.getpid()),
                   "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                   "--factory", "prefect.server.api.server:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "error", "--lifespan", "on"]
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        # Its own session: a terminal's Ctrl-C goes to the whole foreground process group,
        # and a server that died with the run could not record the run's end (Prefect then
        # retried against it for minutes). The run stops it at exit; the guard, if the run
        # is killed.
        self.process = subprocess.Popen(command, env=env, start_new_session=True)
        self.started = time.monotonic()

    def wait(self, timeout: float) -> None:
        """Until ``/health`` answers 200, or ``timeout`` s after the start (a server that
        booted while the run imported its libraries answers at once); raises
        ``TimeoutError``, or ``RuntimeError`` when the server exits. A server that lost its
        port to another process (``PORT_TAKEN``) is restarted on another, at most
        ``MAX_RESTARTS`` times."""
        deadline = self.started + timeout
        restarts = 0
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code == PORT_TAKEN and restarts < MAX_RESTARTS:
                restarts += 1
                self.start()
                deadline = self.started + timeout
                continue
            if code is not None:
                raise RuntimeError(f"the server exited with status {code}")
            try:
                with _LOOPBACK.open(self.api_url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:  # refused while it boots (URLError is an OSError)
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no answer from {self.api_url} within {timeout} s")
            time.sleep(0.1)

    def keep_alive(self) -> None:
        """Restart the server on its port whenever it dies during the run, at most
        ``MAX_RESTARTS`` times, in a daemon thread. Its database keeps the flow run's
        state, and Prefect's client retries a refused call for about a minute, so the run
        goes on instead of waiting minutes and ending as a bug with every stage done."""
        def watch() -> None:
            restarts = 0
            while not self.stopping and restarts < MAX_RESTARTS:
                process = self.process
                code = process.poll() if process is not None else None
                if code is not None and not self.stopping:
                    restarts += 1
                    sys.stderr.write(f"layerwise: the run's Prefect API server stopped "
                                     f"(status {code}); restarting it on port {self.port}\n")
                    self.start(self.port)
                time.sleep(0.5)

        threading.Thread(target=watch, name="prefect-api-keep-alive", daemon=True).start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s, as Prefect stops its own."""
        self.stopping = True
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    for _ in range(10):
        port = random.choice(PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                time.sleep(random.uniform(0.1, 0.5))
                continue
        return port
    raise RuntimeError(f"no free port in {PORTS.start}-{PORTS.stop - 1} after 10 tries")


_server: Optional[_Server] = None
_waited = False


def configured() -> bool:
    """True when Prefect will not start an ephemeral server (an API URL is set, or
    ephemeral servers are disabled)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    return bool(PREFECT_API_URL.value()) or not PREFECT_SERVER_EPHEMERAL_ENABLED.value()


def _point_prefect_at(server: _Server) -> None:
    """This process's Prefect clients, and the processes it starts, use ``server``."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = server.api_url
    refresh_global_settings_context()  # Prefect's own way to pick up the environment


def prestart() -> None:
    """Start the server in the background and point this process's Prefect settings at it
    (no-op when an API is configured, or when already started).

    It is stopped at exit, and by its guard should this process die first."""
    global _server, _waited
    if _server is not None or configured():
        return
    _server, _waited = _Server(), False
    _server.start()
    atexit.register(_server.stop)
    _point_prefect_at(_server)


def ready() -> None:
    """Wait for the server ``prestart`` started, up to Prefect's startup timeout after its
    start; if it does not answer, start it once more and wait twice as long; raise a
    ``TrackingError`` (one paragraph: what happened, what to do) when that fails too. Must
    run before any Prefect client call. Returns at once after the first success, or with
    no server."""
    global _waited
    if _server is None or _waited:
        return
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    first = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    _waited = True
    try:
        _server.wait(first)
    except Exception as exc:  # noqa: BLE001 - a slow or failed boot: one more, longer try
        _server.stop()
        sys.stderr.write(f"layerwise: Prefect's temporary API server did not start ({exc}); "
                         f"trying once more, waiting up to {RETRY_FACTOR * first} s\n")
        _server.start()
        try:
            _server.wait(RETRY_FACTOR * first)
        except Exception as again:  # noqa: BLE001 - reported as one paragraph
            _server.stop()
            raise _startup_error(exc, again) from None
    if os.environ.get("PREFECT_API_URL") != _server.api_url:  # a restart took another port
        _point_prefect_at(_server)
    _server.keep_alive()


def _startup_error(exc: BaseException, again: BaseException) -> BaseException:
    from runtime.errors import TrackingError

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return TrackingError(
        f"Prefect's temporary API server did not start: {_reason(exc)}, and again on a "
        f"second try: {_reason(again)} (load average {load:.1f} on {os.cpu_count()} cores). "
        "Nothing was trained and no MLflow run was started. Start a Prefect server once, in "
        "another terminal (`prefect server start`), and point runs at it with "
        "`export PREFECT_API_URL=http://127.0.0.1:4200/api`; or wait longer with "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600; then rerun the command.")


def _reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def api_url() -> Optional[str]:
    """The URL of the server this process started, or None."""
    return _server.api_url if _server is not None else None


def shared_settings(local_pool: bool) -> dict[Any, Any]:
    """Prefect settings that make a local process pool's workers use this process's API.

    With no API configured, every spawned worker would start an ephemeral API server of its
    own (7-25 s and ~220 MB each, and a port race: six cells of a ``reversal`` run failed
    when the workers' servers lost theirs). The server ``prestart`` started is already in
    the environment the workers inherit; it is also named in the flow's settings, which
    they receive. Nothing is added with a configured API or for a Dask cluster, whose
    workers receive this process's settings from Prefect (so they use this server too,
    which listens on loopback only: workers on other machines need ``PREFECT_API_URL``)."""
    ready()
    if not local_pool or _server is None:
        return {}
    from prefect.settings import PREFECT_API_URL

    return {PREFECT_API_URL: _server.api_url}
