"""The processes a run starts die with it, even under kill -9: the ephemeral Prefect API
server (``main``, the command ``runtime.ephemeral_api`` starts) and a local process pool's
workers (``watch_parent``).

With no ``PREFECT_API_URL``, a run starts a temporary Prefect API server in a child process
(``runtime.ephemeral_api``) and stops it from an ``atexit`` hook. A run killed with SIGKILL
(or by the OOM killer) never runs that hook: the server lived on, measured here for hours,
holding ~220 MB, a port, the Prefect database and the killed run's stdout pipe (a parent
reading that pipe then waits for ever). So the server command runs under this module,
``python -m runtime.orphan_guard PARENT_PID -m uvicorn …``: the same command, plus a thread
that sends the server SIGTERM once its parent process is gone.

Polling ``os.getppid()`` is used rather than Linux's ``PR_SET_PDEATHSIG``, which fires when
the *thread* that started the child exits, not the process, and exists on Linux only.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

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


if __name__ == "__main__":
    main(sys.argv[1:])
