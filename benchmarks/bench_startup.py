"""Fixed costs: ``layerwise --help``, and one ``quick`` pipeline run split into start-up,
training and the rest.

The run is a subprocess (``layerwise run --preset quick``) with a private ``LAYERWISE_HOME``
and ``PREFECT_HOME`` and unbuffered output; every line is time-stamped as it arrives. The
pipeline prints ``  done  <stage>  <seconds> s`` when a stage ends, so:

- ``startup_s``: process start to the start of the first stage (imports, config, Prefect's
  ephemeral API, MLflow set-up, the parent run): the time of the ``done  load-data`` line
  minus that stage's own seconds;
- ``train_s``: the seconds of the ``pretrain-layer-*`` and ``finetune-*`` stages (training
  plus their MLflow records), of which ``fit_s`` is the training itself (the
  ``*/train_seconds`` metrics read back from the run's MLflow database);
- ``total_s``: wall time of the process.

The fixed cost (issue 17's split) comes from the parent MLflow run's start and end times:

- ``before_parent_s``: process start to the parent run's creation (imports, config,
  Prefect's ephemeral API, the MLflow store);
- ``fit_s``: the training loops (above);
- ``inside_other_s``: the rest of the parent run's life (data, codes, figures, checksums,
  MLflow records, evaluation, registration);
- ``after_parent_s``: the parent run's end to the process's exit;
- ``outside_training_s``: ``total_s − fit_s``, the target's figure (≤ ``MAX_OUTSIDE_S``).

The runs use the user's ``PREFECT_HOME`` (an existing Prefect database: what every run
pays) and one private MLflow store: the first run creates it (reported under ``new_store``),
the measured ones find it (with ``--fresh``, so they train every stage). With ``cold=True``
a run on a fresh ``PREFECT_HOME`` measures a first-ever start (Prefect creates and migrates
its database), reported under ``cold``. ``imports_s`` is the floor: a process that only
imports what a run needs.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.common import REPO

#: Issue 17's target for a ``quick`` run: seconds outside its training loops.
MAX_OUTSIDE_S = 5.0
DONE = re.compile(r"^\s*done\s+(?P<stage>\S+)\s+(?P<seconds>[\d.]+) s")


def layerwise_command() -> list[str]:
    script = Path(sys.executable).with_name("layerwise")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli.main"]


def _env(home: Path, fresh_prefect: bool, threads: Optional[int]) -> dict[str, str]:
    env = dict(os.environ, LAYERWISE_HOME=str(home / "layerwise"), PYTHONUNBUFFERED="1", CI="1")
    if fresh_prefect:
        env["PREFECT_HOME"] = str(home / "prefect")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the child
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)  # the embedded stores and an ephemeral Prefect API
    return env


def help_seconds(repeats: int = 3) -> float:
    """Best wall time of ``layerwise --help``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([*layerwise_command(), "--help"], check=True, capture_output=True,
                       cwd=REPO)
        best = min(best, time.perf_counter() - t0)
    return round(best, 3)


#: The latest run without a parent: the pipeline's parent run of the last ``quick`` run.
LATEST_PARENT = ("SELECT run_uuid, start_time, end_time FROM runs WHERE run_uuid NOT IN "
                 "(SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId') "
                 "ORDER BY start_time DESC LIMIT 1")


def _train_seconds(db: Path) -> Optional[float]:
    """Σ of the ``*/train_seconds`` metrics (pure training per stage) of the latest parent
    run's stages (its child runs), the time of stages trained together counted once."""
    try:
        with sqlite3.connect(db) as con:
            parent = con.execute(LATEST_PARENT).fetchone()
            rows = con.execute(
                "SELECT m.value, (SELECT s.value FROM tags s WHERE s.run_uuid = m.run_uuid "
                "AND s.key = 'layerwise.trained_together') FROM metrics m JOIN tags t "
                "ON t.run_uuid = m.run_uuid WHERE t.key = 'mlflow.parentRunId' AND "
                "t.value = ? AND m.key LIKE '%/train_seconds'", (parent[0],)) if parent else []
            # stages that trained together log the wall time they shared: count it once
            values = list({(together or i, v) for i, (v, together) in enumerate(rows)})
            values = [v for _, v in values]
        return round(sum(values), 2) if values else None
    except sqlite3.Error:
        return None


def _parent_times(db: Path) -> Optional[tuple[float, float]]:
    """(start, end) of the latest parent run in seconds since the epoch."""
    try:
        with sqlite3.connect(db) as con:
            row = con.execute(LATEST_PARENT).fetchone()
        return (row[1] / 1000, row[2] / 1000) if row and row[2] else None
    except sqlite3.Error:
        return None


#: What every run imports before its first stage (``flows.pipeline.run_pipeline``).
IMPORTS = "import lightning, mlflow.pytorch, prefect.flows, prefect.settings"


def import_seconds(repeats: int = 3) -> float:
    """Best wall time of a Python process that only imports ``IMPORTS``: the floor of the
    start-up of any run in one process on this machine (compiled bytecode cached)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORTS], check=True, capture_output=True,
                       cwd=REPO)
        best = min(best, time.perf_counter() - t0)
    return round(best, 2)


def quick_run(data_dir: Path, home: Path, cold: bool, threads: Optional[int] = None,
              timeout: float = 1800, log=print, fresh: bool = False,
              label: str = "usual") -> dict[str, Any]:
    cmd = [*layerwise_command(), "run", "--preset", "quick", "--data-dir", str(data_dir),
           *(["--fresh"] if fresh else [])]
    stages: dict[str, dict[str, float]] = {}
    t0, wall0 = time.perf_counter(), time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(home, cold, threads),
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        tail = (tail + [line.rstrip()])[-20:]
        m = DONE.match(line)
        if m:
            stages[m["stage"]] = {"at_s": round(now, 2), "seconds": float(m["seconds"])}
    code = proc.wait(timeout=timeout)
    total, wall1 = time.perf_counter() - t0, time.time()
    if code != 0 or "load-data" not in stages:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {code}:\n" + "\n".join(tail))
    first = stages["load-data"]
    startup = first["at_s"] - first["seconds"]
    train = sum(s["seconds"] for name, s in stages.items()
                if name.startswith(("pretrain-", "finetune-")))
    row = {
        "startup_s": round(startup, 2),
        "load_data_s": first["seconds"],
        "train_s": round(train, 2),
        "fit_s": _train_seconds(home / "layerwise" / "mlflow.db"),
        "evaluate_s": stages.get("evaluate", {}).get("seconds"),
        "total_s": round(total, 2),
        "stages": stages,
    }
    row["other_s"] = round(total - startup - sum(s["seconds"] for s in stages.values()), 2)
    parent = _parent_times(home / "layerwise" / "mlflow.db")
    if parent and row["fit_s"] is not None:
        row.update({
            "before_parent_s": round(parent[0] - wall0, 2),
            "inside_other_s": round(parent[1] - parent[0] - row["fit_s"], 2),
            "after_parent_s": round(wall1 - parent[1], 2),
            "outside_training_s": round(total - row["fit_s"], 2),
        })
        log(f"  fixed cost: {row['before_parent_s']:.1f} s before the parent run, "
            f"{row['fit_s']:.1f} s training loops, {row['inside_other_s']:.1f} s the rest "
            f"inside it, {row['after_parent_s']:.1f} s after it: "
            f"{row['outside_training_s']:.1f} s outside training")
    log(f"  quick run ({label}): start-up {row['startup_s']:.1f} s, "
        f"load-data {row['load_data_s']:.1f} s, training stages {row['train_s']:.1f} s "
        f"(fit {row['fit_s']} s), evaluate {row['evaluate_s']} s, after the last stage "
        f"{row['other_s']:.1f} s, total {row['total_s']:.1f} s")
    return row


def run(data_dir: Path, cold: bool = False, threads: Optional[int] = None, repeats: int = 1,
        log=print) -> dict[str, Any]:
    """A first run in a new MLflow store, then ``repeats`` usual runs in that store
    (``--fresh``: every stage retrained, as the first): the one with the fastest start-up is
    reported, every run's start-up and total under ``startup_s_runs`` / ``total_s_runs`` (a
    shared machine moves them by several seconds), the first run under ``new_store``. Also
    ``imports_s``: the import floor (``import_seconds``)."""
    with tempfile.TemporaryDirectory(prefix="layerwise-bench-") as tmp:
        home = Path(tmp) / "usual"
        first = quick_run(data_dir, home, cold=False, threads=threads, log=log,
                          label="first in a new MLflow store")
        rows = [quick_run(data_dir, home, cold=False, threads=threads, log=log, fresh=True)
                for _ in range(max(1, repeats))]
        result = dict(min(rows, key=lambda r: r["startup_s"]))
        result["startup_s_runs"] = [r["startup_s"] for r in rows]
        result["total_s_runs"] = [r["total_s"] for r in rows]
        result["outside_training_s_runs"] = [r.get("outside_training_s") for r in rows]
        result["new_store"] = {k: v for k, v in first.items() if k != "stages"}
        if cold:
            first = quick_run(data_dir, Path(tmp) / "cold", cold=True, threads=threads, log=log,
                              label="first-ever: new Prefect database")
            result["cold"] = {k: v for k, v in first.items() if k != "stages"}
    result["imports_s"] = import_seconds()
    log(f"  imports alone ({IMPORTS}): {result['imports_s']:.2f} s")
    return result
