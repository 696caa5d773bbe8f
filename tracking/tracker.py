"""MLflow record of a pipeline run: a parent run, one nested child run per stage, and the
registered classifier. Every run ends FINISHED, FAILED or KILLED, never left RUNNING.

The embedded default is a SQLite store at ``<home>/mlflow.db`` with artifacts beside it in
``<home>/artifacts`` (``home`` is ``$LAYERWISE_HOME`` or ``./mlruns``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from tracking.conventions import EXPERIMENT_DESCRIPTION, EXPERIMENT_KIND, system_tags
from runtime.errors import TrackingError
from runtime.home import layerwise_home
from tracking.uri import preflight_mlflow

# A stage run that uploaded the artifacts of a content key (data and checkpoint digests)
# carries ARTIFACTS_KEY_TAG; a later run with the same key points at it instead of uploading.
from tracking.retries import with_retries
from tracking.vocabulary import (ARTIFACTS_FROM_TAG, ARTIFACTS_KEY_TAG, CACHED_TAG,  # noqa: F401
                                 HOST_TAG, KIND_TAG, NOTE_TAG, PID_TAG, STAGE_TAG)
MAX_PARAM_CHARS = 6000
MAX_BATCH = 1000


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded SQLite store under ``<home>``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{layerwise_home()}/mlflow.db"


def is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, SIGTERM (via our handler or Prefect's ``TerminationSignal``) or an exit."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return True
    from prefect.exceptions import TerminationSignal

    return isinstance(exc, TerminationSignal)


def interrupt_cause(exc: BaseException) -> str:
    """What stopped a run, in a few words: "Ctrl-C", "SIGTERM" or "exit"."""
    text = str(exc)
    if isinstance(exc, SystemExit):
        return "exit"
    if isinstance(exc, KeyboardInterrupt) and "signal 15" not in text:
        return "Ctrl-C"
    return "SIGTERM"


def git_commit() -> str:
    """The commit of the checkout the code runs from, with ``-dirty`` if modified."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_params(device: str, precision: str) -> dict[str, str]:
    """Versions, commit, device and the precision trained in: what it takes to repeat a run.

    Args:
        device: The training device, e.g. ``cpu``.
        precision: The Lightning precision used (``runtime.devices.precision_used``:
            ``runtime.precision = auto`` resolved for this machine), recorded as
            ``runtime.precision_used``.
    """
    import lightning
    import mlflow
    import prefect
    import torch

    return {
        "git.commit": git_commit(),
        "version.torch": torch.__version__,
        "version.lightning": lightning.__version__,
        "version.prefect": prefect.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": platform.python_version(),
        "device": device,
        "runtime.precision_used": precision,
    }


def enable_wal(db: Path) -> None:
    """Write-ahead logging on the embedded SQLite store, so that concurrent runs' readers
    never block writers; the setting is stored in the database file itself."""
    import sqlite3

    db.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        con.execute("PRAGMA journal_mode=WAL")


@contextlib.contextmanager
def sqlite_init_lock(db: Path) -> Iterator[None]:
    """An exclusive lock on ``<db>.lock`` while this process creates or migrates the store
    and its experiment: MLflow creates its tables without ``IF NOT EXISTS``, so eight runs
    started at once into a new store otherwise fail with "table ... already exists"."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no concurrent start-up protection
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def safe_artifact_path(path: Optional[str]) -> Optional[str]:
    """An artifact path must stay inside its run's artifact directory: relative, no ``..``,
    no backslashes or NUL. Names can come from user input (grid values, model names)."""
    if path is None:
        return None
    parts = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or "\x00" in path
            or any(p in ("..", "") for p in parts) or ":" in parts[0]):
        raise ValueError(f"unsafe artifact path {path!r}: use a relative path without '..'")
    return path


class Tracker:
    """Thin wrapper over ``MlflowClient`` with explicit run ids (no fluent global state).

    Args:
        tracking_uri: MLflow tracking URI; None for ``default_tracking_uri()``.
        experiment: Experiment name, created when absent.
        source_name: The code that runs (``mlflow.source.name``), e.g. ``flows/pipeline.py``.
    """

    def __init__(self, tracking_uri: Optional[str] = None, experiment: str = "layerwise",
                 source_name: str = "layerwise"):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.system_tags = system_tags(source_name)
        self.uri = tracking_uri or default_tracking_uri()
        preflight_mlflow(self.uri)
        local_db = Path(self.uri[len("sqlite:///"):]) if self.uri.startswith("sqlite:///") else None
        with sqlite_init_lock(local_db) if local_db else contextlib.nullcontext():
            if local_db:
                enable_wal(local_db)
            mlflow.set_tracking_uri(self.uri)
            self.client = MlflowClient(self.uri)
            self._open_experiment(experiment)
        self.experiment = experiment

    def _open_experiment(self, experiment: str) -> None:
        try:
            self.experiment_id = self._get_or_create(experiment)
        except Exception as exc:  # noqa: BLE001 - any failure here means "cannot track"
            raise TrackingError(
                f"cannot use MLflow tracking URI {self.uri!r} (experiment {experiment!r}): "
                f"{exc}. Start the server, or unset MLFLOW_TRACKING_URI/--tracking-uri to use "
                "the embedded SQLite store"
            ) from exc

    def _get_or_create(self, experiment: str) -> str:
        """The experiment's id, creating it if needed. Runs started at once against a
        tracking server race to create it (seen: eight runs on the PostgreSQL-backed server,
        one failed with RESOURCE_ALREADY_EXISTS); the loser uses the winner's."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(experiment)
        tags = {NOTE_TAG: EXPERIMENT_DESCRIPTION, **EXPERIMENT_KIND}
        if exp is not None:
            for key, value in tags.items():
                if key not in exp.tags:
                    self.client.set_experiment_tag(exp.experiment_id, key, value)
            return exp.experiment_id
        location = (layerwise_home() / "artifacts").as_uri() if is_local(self.uri) else None
        try:
            return self.client.create_experiment(experiment, location, tags=tags)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            return exp.experiment_id

    @contextlib.contextmanager
    def run(self, name: str, tags: dict[str, str], parent_id: Optional[str] = None
            ) -> Iterator[str]:
        """A run that ends FINISHED on success, KILLED on Ctrl-C/SIGTERM, FAILED otherwise."""
        run_id = self.start_run(name, tags, parent_id)
        try:
            yield run_id
        except BaseException as exc:
            self.end_run(run_id, exc)
            raise
        self.end_run(run_id)

    def start_run(self, name: str, tags: dict[str, str], parent_id: Optional[str] = None
                  ) -> str:
        """A new RUNNING run carrying this process's id and host (so that a rerun can tell
        it was left behind by a killed process, ``tracking.stale``); end it with
        ``end_run``."""
        tags = {**self.system_tags, PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(),
                **tags}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = with_retries(self.client.create_run, self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def end_run(self, run_id: str, exc: Optional[BaseException] = None,
                status: Optional[str] = None) -> None:
        """End a run: ``status`` when given, else FINISHED, or for the exception that ended
        it KILLED (Ctrl-C, SIGTERM) or FAILED. A server that is gone cannot take it."""
        from runtime.faults import unreachable

        if exc is not None and unreachable(exc) is not None:
            return
        status = status or ("FINISHED" if exc is None
                            else "KILLED" if is_interrupt(exc) else "FAILED")
        with_retries(self.client.set_terminated, run_id, status)

    def log_inputs(self, run_id: str, datasets: list[Any]) -> None:
        """Datasets (``mlflow.entities.DatasetInput``) the run read."""
        with_retries(self.client.log_inputs, run_id, datasets=datasets)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            with_retries(self.client.log_batch, run_id, params=items[i : i + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        with_retries(self.client.log_batch, run_id,
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self._log_metric_rows(run_id, [(k, v, step) for k, v in metrics.items()])

    def log_history(self, run_id: str, prefix: str, rows: list[dict[str, float]]) -> None:
        """Per-epoch histories as ``<prefix>/<name>`` with ``step`` = epoch."""
        self._log_metric_rows(run_id, [
            (f"{prefix}/{name}", value, int(row["epoch"]))
            for row in rows for name, value in row.items() if name not in ("epoch", "step")
        ])

    def _log_metric_rows(self, run_id: str, rows: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v, step in rows]
        for i in range(0, len(metrics), MAX_BATCH):
            with_retries(self.client.log_batch, run_id, metrics=metrics[i : i + MAX_BATCH])

    def log_artifact(self, run_id: str, path: Path, artifact_path: Optional[str] = None) -> None:
        with_retries(self.client.log_artifact, run_id, str(path),
                     safe_artifact_path(artifact_path))

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        with_retries(self.client.log_text, run_id,
                     json.dumps(obj, indent=2, sort_keys=True, default=str),
                     safe_artifact_path(artifact_file))

    def find_run(self, tags: dict[str, str]) -> Optional[str]:
        """The oldest FINISHED run of this experiment carrying all ``tags``, or None."""
        clauses = [f"tags.`{k}` = '{quote_filter(v)}'" for k, v in tags.items()]
        runs = with_retries(self.client.search_runs, [self.experiment_id],
                            " and ".join([*clauses, "attributes.status = 'FINISHED'"]),
                            max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None


def quote_filter(text: str) -> str:
    """A value inside single quotes of an MLflow search filter."""
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
