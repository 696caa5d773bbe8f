"""An ablation on a local process pool stops in seconds, whatever stops it: Ctrl-C from a
terminal (SIGINT to the whole process group) or a signal to the run alone (``kill PID``, a
service manager's SIGTERM, ``kill -INT PID``).

The moment chosen is the one that hung: layer 1 and the random-init cell training in the
two workers, and layer 2 and the pretrained cell waiting for them in Prefect's resolver threads.
Before ``runtime.worker_pool``, a signal to the run alone waited for the workers' tasks to
end, and a terminal's Ctrl-C left the waiting tasks, and so the run, hanging for ever (the
interrupted tasks ended with ``KeyboardInterrupt``, which Prefect's pool never passes on).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
# Batch 1: layer 1 is 20 x 1,000 steps (about 10 s), long enough to be stopped in the middle.
GRID = """
name: signals
base:
  preset: quick
  overrides:
    data: {n_train: 1000}
    model: {hidden_sizes: [64, 64]}
    pretrain: {epochs: 20, batch_size: 1}
    finetune: {max_epochs: 20, batch_size: 1, early_stopping: patience, patience_epochs: 20}
factors:
  init: [pretrained, tutorial]
  seeds: [0]
retries: 1
"""


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def _foreground_job() -> None:  # as a terminal starts it: its own group, SIGINT delivered
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgid(0, 0)


def _metrics(db: Path, pattern: str) -> int:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=5)) as con:
            return con.execute("SELECT count(*) FROM metrics WHERE key LIKE ?",
                               (pattern,)).fetchone()[0]
    except sqlite3.OperationalError:  # the store is still being created
        return 0


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("signum,group", [
    (signal.SIGINT, True),      # Ctrl-C from a terminal
    (signal.SIGTERM, False),    # kill PID
    pytest.param(signal.SIGINT, False, marks=pytest.mark.slow),  # kill -INT PID
])
def test_a_signal_stops_a_pooled_ablation_in_seconds(tmp_path, shared_data_dir, signum, group):
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID)
    home = tmp_path / "home"
    env = {**os.environ, "LAYERWISE_HOME": str(home), "PYTHONUNBUFFERED": "1", "CI": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "ablate", "--grid", str(grid), "--workers", "2",
         "--data-dir", str(shared_data_dir), "--out", str(tmp_path / "out")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=_foreground_job)
    try:
        started = time.monotonic()
        deadline = started + 300
        # Layer 1 has logged an epoch: the random-init cell, submitted with it, trains too.
        while not _metrics(home / "mlflow.db", "pretrain/layer_1/%"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        workers = {pid for pid in _children(proc.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}
        assert len(workers) == 2
        sent = time.monotonic()
        os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
        out, _ = proc.communicate(timeout=120)
        seconds = time.monotonic() - sent
        print(f"signal after {sent - started:.0f} s, stopped in {seconds:.1f} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert seconds < 20, f"{seconds:.0f} s to stop\n{out}"  # layer 1 alone had 10 s left
    assert "Traceback" not in out and "bug" not in out, out
    assert "interrupted; the MLflow runs were marked KILLED" in out
    assert not any(_alive(pid) for pid in workers)
    client = MlflowClient(f"sqlite:///{home}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and "RUNNING" not in {r.info.status for r in runs}
    assert not list(home.rglob("*.tmp"))  # no half-written checkpoint
