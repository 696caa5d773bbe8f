"""The processes a run starts die with it, even under kill -9: the ephemeral Prefect API
server (``install``) and a local process pool's workers (``watch_parent``).

With no ``PREFECT_API_URL``, Prefect starts a temporary API server in a child process
(``SubprocessASGIServer``) and stops it from an ``atexit`` hook. A run killed with SIGKILL
(or by the OOM killer) never runs that hook: the server lived on, measured here for hours,
holding ~220 MB, a port, the Prefect database and the killed run's stdout pipe (a parent
reading that pipe then waits for ever). ``install()`` starts Prefect's server command under
this module instead, ``python -m runtime.orphan_guard PARENT_PID -m uvicorn …``: the same
command, plus a thread that sends the server SIGTERM once its parent process is gone.

Polling ``os.getppid()`` is used rather than Linux's ``PR_SET_PDEATHSIG``, which fires when
the *thread* that started the child exits, and Prefect starts the server from whichever
thread first needs a client.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import types

POLL_S = 0.5
#: After the stop signal a process has this long to shut down before it is killed.
GRACE_S = 10.0


def _watch(parent: int, signum: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signum)
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def _start_watch(parent: int, signum: int) -> None:
    threading.Thread(target=_watch, args=(parent, signum), name="orphan-guard",
                     daemon=True).start()


def watch_parent(parent: int) -> None:
    """``ProcessPoolExecutor`` initializer (``initargs=(os.getpid(),)``): the worker stops
    once ``parent`` is gone. Spawned pool workers otherwise outlive a run killed with
    SIGKILL, measured here: idle for ever, each holding torch and its data. SIGINT first,
    so ``finally`` blocks (temporary files of atomic writes) run; SIGKILL after GRACE_S."""
    if os.getppid() != parent:  # the parent died before this worker started
        os._exit(1)
    _start_watch(parent, signal.SIGINT)


def main(argv: list[str]) -> None:
    """``PARENT_PID -m MODULE ARGS...``: run MODULE as ``python -m`` would, watched."""
    if len(argv) < 3 or argv[1] != "-m":
        raise SystemExit("usage: python -m runtime.orphan_guard PARENT_PID -m MODULE [ARGS...]")
    parent, module = int(argv[0]), argv[2]
    if os.getppid() != parent:  # the parent died before we got here
        raise SystemExit(1)
    _start_watch(parent, signal.SIGTERM)  # uvicorn shuts down on SIGTERM
    sys.argv = [module, *argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


class _GuardedPopen(subprocess.Popen):
    """``subprocess.Popen`` that starts ``python -m uvicorn …`` under the guard."""

    def __init__(self, args, *rest, **kwargs):
        if isinstance(args, (list, tuple)) and list(args[1:3]) == ["-m", "uvicorn"]:
            args = [args[0], "-m", "runtime.orphan_guard", str(os.getpid()), *args[1:]]
        super().__init__(args, *rest, **kwargs)


def install() -> None:
    """Make Prefect's ephemeral API servers started by this process die with it.

    Replaces the ``subprocess`` that ``prefect.server.api.server`` sees by one whose
    ``Popen`` wraps the uvicorn command; every other name is the real module's. Call it
    only when no ``PREFECT_API_URL`` is set (a real server is nobody's child)."""
    from prefect.server.api import server

    if getattr(server.subprocess, "Popen", None) is _GuardedPopen:
        return
    shim = types.ModuleType("subprocess")
    shim.__dict__.update(subprocess.__dict__)
    shim.Popen = _GuardedPopen
    server.subprocess = shim


if __name__ == "__main__":
    main(sys.argv[1:])
