"""Serve deployments from this process until Ctrl-C or SIGTERM, and end the runs in progress
when told to stop; ``serve_environment`` sets up what the flow runs it starts need.

``prefect.serve`` leaves a flow run that is in progress behind when the serving process gets
SIGTERM: Prefect 3.8.8's ``Runner.handle_sigterm`` calls ``stop()`` from inside the running
event loop, where it only creates the ``astop()`` coroutine (never awaited: "coroutine
'Runner.astop' was never awaited"), then exits. The flow run's process was never told, so the
flow run stayed RUNNING in Prefect and its MLflow runs RUNNING (seen with
``layerwise schedule serve`` and ``kill PID``).

Here both signals schedule ``Runner.astop()`` on the loop: it asks every flow run in
progress to cancel (SIGTERM to its process, which marks the stage's and the parent's MLflow
runs KILLED on the way out), marks them CANCELLED in Prefect, then stops polling; leaving
the runner pauses the deployments' schedules. A second signal while stopping exits at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from typing import Any, Optional


def serve_environment() -> None:
    """What ``layerwise run`` sets up, for the flow runs this process starts: the stores of
    this shell (``$LAYERWISE_HOME``, else ``./mlruns`` here, pinned before any flow run
    exists), persisted task results beside the checkpoints under
    ``$LAYERWISE_HOME/prefect-results``."""
    from runtime.home import layerwise_home

    os.environ.setdefault("LAYERWISE_HOME", str(layerwise_home()))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(layerwise_home() / "prefect-results"))


def serve_until_signalled(deployments: list[Any], limit: Optional[int]) -> None:
    """Serve ``deployments`` (``RunnerDeployment``) until SIGTERM or SIGINT, then cancel the
    flow runs in progress and pause the schedules.

    Args:
        deployments: What to serve (``flow.to_deployment(...)``).
        limit: Flow runs at once; a later one waits.
    """
    from prefect.runner import Runner

    class StoppingRunner(Runner):
        """A runner whose SIGTERM handler really awaits ``astop()``."""

        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:  # noqa: ARG002
            stop(signal.SIGTERM, None)

    runner = StoppingRunner(pause_on_shutdown=True, limit=limit)
    for deployment in deployments:
        runner.add_deployment(deployment)
    loop_box: dict[str, asyncio.AbstractEventLoop] = {}
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:  # noqa: ARG001
        if stopping.is_set() or "loop" not in loop_box:
            raise KeyboardInterrupt(f"signal {signum} while stopping")
        stopping.set()
        runner._logger.info("Signal %s received: cancelling the flow runs in progress, "
                            "pausing the schedules", signum)
        loop_box["loop"].call_soon_threadsafe(lambda: asyncio.ensure_future(runner.astop()))

    async def main() -> None:
        loop_box["loop"] = asyncio.get_running_loop()
        await runner.start()

    previous = signal.signal(signal.SIGINT, stop)  # before asyncio.run: it keeps ours
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
