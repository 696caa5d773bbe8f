"""The processes a run starts die with it, even under kill -9: the ephemeral Prefect API
server (``main``, the command ``runtime.ephemeral_api`` starts) and a local process pool's
workers (``watch_parent``). A pool's workers also stop their task when the run stops while
it is alive (Ctrl-C, SIGTERM, an error: ``runtime.worker_pool``).

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
from typing import Any, Optional

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


#: Set by the run when it stops while its pool workers may still be busy (``watch_parent``).
_STOP: Optional[Any] = None


def watch_parent(parent: int, stop: Optional[Any] = None) -> None:
    """``ProcessPoolExecutor`` initializer (``initargs=(os.getpid(), stop)``): the worker
    stops when ``parent`` is gone, and its task when ``stop`` (a multiprocessing ``Event``)
    is set.

    Spawned pool workers otherwise outlive a run killed with SIGKILL, measured here: idle for
    ever, each holding torch and its data. And a run stopped by SIGTERM, or by a SIGINT sent
    to it alone (``kill -INT PID``), waited for its workers' tasks to end, which Prefect's
    pool cannot cancel once started: a `tutorial` layer is 12 minutes, a cell hours.

    A worker's task is stopped cooperatively: a SIGINT (the terminal's Ctrl-C) or the run's
    stop is remembered (``runtime.interrupts.note_interrupt``) and raised as
    ``KeyboardInterrupt`` at the next batch of training, inside the task, where
    ``runtime.worker_pool.stops_with_the_run`` ends it. Raised wherever the signal landed
    (in Prefect's engine, measured), it escaped the task and left the tasks that depend on
    it waiting for ever. An orphan (its parent gone) exits at once when idle; a busy one is
    killed GRACE_S after its stop."""
    global _STOP
    if os.getppid() != parent:  # the parent died before this worker started
        os._exit(1)
    _STOP = stop
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored
        signal.signal(signal.SIGINT, _note_interrupt)
    threading.Thread(target=_watch_worker, args=(parent,), name="orphan-guard",
                     daemon=True).start()


def stop_requested() -> bool:
    """Whether the run that owns this pool worker is stopping: a task that starts now (one
    the pool had already queued) should not."""
    return _STOP is not None and _STOP.is_set()


def _note_interrupt(signum: int, frame: Any) -> None:
    """A pool worker's SIGINT: remembered, raised at the next batch of its task's training;
    ignored while the worker waits for work."""
    from runtime.interrupts import note_interrupt

    if not _idle(frame):
        note_interrupt(f"signal {signum}")


def _idle(frame: Any) -> bool:
    """Whether ``frame`` (the main thread's) waits for work: the first frame outside
    ``multiprocessing`` is the loop of ``concurrent.futures``' pool worker."""
    import multiprocessing

    mp_dir = os.path.dirname(os.path.abspath(multiprocessing.__file__))
    while frame is not None and frame.f_code.co_filename.startswith(mp_dir):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_name == "_process_worker"


def _main_frame() -> Any:
    return sys._current_frames().get(threading.main_thread().ident)


def _watch_worker(parent: int) -> None:
    from runtime.interrupts import note_interrupt

    stopped = False
    while os.getppid() == parent:
        if not stopped and stop_requested():
            stopped = True
            note_interrupt("the run is stopping")
        time.sleep(POLL_S)
    if _idle(_main_frame()):
        os._exit(1)
    note_interrupt("the run is gone")
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


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
