"""Faults of the world told apart from bugs: a full disk, a read-only folder, exhausted
memory, and a tracking or Prefect server that stopped answering.

Each becomes one of the project's own errors (``runtime.errors``), whose message says what
ran out or stopped, where, and that rerunning the same command resumes after the last
finished stage. The CLI prints it as one line, without a traceback (``cli.common``).
The exception itself may be deep in a chain (safetensors' ``SafetensorError`` wrapping the
``OSError``; MLflow's ``MlflowException`` wrapping urllib3's retries), so the whole chain
of causes and contexts is searched.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Iterator, Optional

from runtime.errors import ResourceError, TrackingError

RESUME = "then rerun the same command: the stages that finished are reused"
DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded")
MEMORY_TEXT = ("not enough memory", "can't allocate memory", "cannot allocate memory",
               "out of memory")
#: How an HTTP client says the server is not there (refused, reset, silent).
UNREACHABLE_TEXT = ("max retries exceeded", "connection refused", "failed to establish",
                    "connection aborted", "connection reset", "remotedisconnected",
                    "read timed out", "connecttimeout", "all connection attempts failed")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or during, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]


def _free(path: Optional[Path]) -> str:
    """``"123 MB free"`` on the file system of ``path`` (or its nearest existing parent)."""
    while path is not None and not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path or '.').free / 1e6:.0f} MB free"
    except OSError:
        return "free space unknown"


def resource_error(exc: BaseException, where: Optional[Path] = None
                   ) -> Optional[ResourceError]:
    """The ``ResourceError`` that ``exc`` really is (a full disk, a read-only folder, no
    memory), or None.

    Args:
        exc: What was raised.
        where: The file or folder being written, when the caller knows it.
    """
    for e in causes(exc):
        text = str(e).lower()
        code = getattr(e, "errno", None)
        target = Path(where or getattr(e, "filename", None) or ".")
        if code in (errno.ENOSPC, errno.EDQUOT) or any(t in text for t in DISK_FULL_TEXT):
            return ResourceError(
                f"no space left on the disk of {target} ({_free(target)}) while writing it: "
                "free some space or point LAYERWISE_HOME at a larger disk, " + RESUME)
        if code == errno.EROFS or "read-only file system" in text:
            return ResourceError(
                f"{target} is on a read-only file system: point LAYERWISE_HOME (or the "
                "tracking store) at a writable folder, " + RESUME)
        if isinstance(e, MemoryError) or (code == errno.ENOMEM
                                          or any(t in text for t in MEMORY_TEXT)):
            return ResourceError(
                "this machine ran out of memory: lower runtime.eval_batch_size, the batch "
                "sizes, data.n_train or the population size, or free memory, " + RESUME)
    return None


def unreachable(exc: BaseException) -> Optional[str]:
    """Why an HTTP client's server was gone, in a few words ("connection refused", "no
    answer in time", "connection lost"), or None for any other failure."""
    text = " | ".join(f"{type(e).__name__}: {e}" for e in causes(exc)).lower()
    if not any(t in text for t in UNREACHABLE_TEXT):
        return None
    if "refused" in text or "failed to establish" in text:
        return "connection refused"
    if "timed out" in text or "timeout" in text:
        return "no answer in time"
    return "connection lost"


def server_error(exc: BaseException, tracking_uri: str, home: Path) -> Optional[TrackingError]:
    """The ``TrackingError`` that ``exc`` is when the MLflow or Prefect server stopped
    answering during the run, or None.

    Args:
        exc: What was raised.
        tracking_uri: The MLflow tracking URI of the run.
        home: ``LAYERWISE_HOME``, where the finished stages are kept.
    """
    reason = unreachable(exc)
    if reason is None:
        return None
    prefect = any(type(e).__module__.split(".")[0] in ("httpx", "httpcore", "prefect")
                  for e in causes(exc))
    server = "the Prefect API" if prefect else f"the MLflow tracking server at {tracking_uri}"
    return TrackingError(
        f"{server} stopped answering during the run ({reason}). The stages that finished "
        f"are kept under {home}; the record of this attempt is incomplete (`layerwise runs "
        "--stale --mark-failed` closes its runs). Once the server answers again, rerun the "
        "same command: finished stages come from the cache and are recorded again.")
