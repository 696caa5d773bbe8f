"""Runs left RUNNING with no live process behind them (``layerwise runs --stale``)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from tracking.client import call, search_runs, timestamp, to_int
from tracking.queries import experiment_id
from tracking.vocabulary import HOST_TAG, KIND_TAG, PARENT_TAG, PID_TAG, STAGE_TAG


def stale_runs(client: Any, experiment: str = "layerwise", older_than_hours: float = 24.0,
               now_ms: Optional[int] = None) -> pd.DataFrame:
    """Runs (parents and stages) left RUNNING with no live process behind them.

    A RUNNING run is stale when it carries ``layerwise.host`` = this host and its
    ``layerwise.pid`` is not alive (or was reused by a process that started after the run);
    or when it started more than ``older_than_hours`` ago and either lacks those tags or was
    started on another host, whose processes cannot be checked from here.

    Returns:
        Columns ``run_id, name, stage, parent_run_id, host, pid, start_time, age_h, reason``.
    """
    exp_id = experiment_id(client, experiment)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    here = socket.gethostname()
    rows = []
    for run in search_runs(client, [exp_id], "attributes.status = 'RUNNING'",
                       ["attributes.start_time DESC"]):
        tags, start = run.data.tags, run.info.start_time or now_ms
        age_h = (now_ms - start) / 3_600_000
        host, pid = tags.get(HOST_TAG), to_int(tags.get(PID_TAG))
        old = age_h > older_than_hours
        if host == here and pid is not None:
            reason = None if _pid_alive(pid, start) else f"process {pid} is not running"
        elif host is not None and pid is not None:
            reason = f"started on {host} {age_h:.1f} h ago" if old else None
        else:
            reason = f"no {PID_TAG}/{HOST_TAG} tags, started {age_h:.1f} h ago" if old else None
        if reason:
            rows.append({"run_id": run.info.run_id, "name": run.info.run_name,
                         "stage": tags.get(KIND_TAG) or tags.get(STAGE_TAG),
                         "parent_run_id": tags.get(PARENT_TAG), "host": host, "pid": pid,
                         "start_time": timestamp(run.info.start_time), "age_h": age_h,
                         "reason": reason})
    df = pd.DataFrame(rows, columns=["run_id", "name", "stage", "parent_run_id", "host", "pid",
                                     "start_time", "age_h", "reason"])
    return df.astype({"pid": "Int64"})


def mark_failed(client: Any, run_ids: Iterable[str]) -> list[str]:
    """End the given runs as FAILED (``set_terminated``); returns their ids."""
    done = []
    for run_id in run_ids:
        call(client.set_terminated, run_id, "FAILED")
        done.append(run_id)
    return done


def end_dead_runs(client: Any, experiment: str = "layerwise") -> list[str]:
    """End as KILLED the RUNNING runs started on this host by a process that is gone (a
    ``kill -9``, the OOM killer): a rerun calls it before it starts, so the attempt it
    resumes is not left RUNNING. Runs of other hosts are left alone (their processes
    cannot be checked from here). Returns their ids."""
    here = socket.gethostname()
    dead = stale_runs(client, experiment, older_than_hours=float("inf"))
    ids = [r.run_id for r in dead.itertuples() if r.host == here]
    for run_id in ids:
        call(client.set_terminated, run_id, "KILLED")
    return ids


def _pid_alive(pid: int, started_ms: int) -> bool:
    """Whether ``pid`` is a live process that could have started the run."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    born = _process_start_ms(pid)
    # A process born after the run started is a reused pid, not the run's process.
    return born is None or born <= started_ms + 1000


def _process_start_ms(pid: int) -> Optional[int]:
    """Start time of a process from /proc (Linux), or None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return int((btime + ticks / os.sysconf("SC_CLK_TCK")) * 1000)
    except (OSError, ValueError, IndexError, StopIteration):
        return None
