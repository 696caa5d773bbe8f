"""The MLflow client as the registry commands use it: one connection, every page of a
search, and MLflow's failures as one-line ``RegistryError``s."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pandas as pd

from runtime.errors import LayerwiseError

PAGE = 1000


class RegistryError(LayerwiseError):
    """An unknown experiment, run or model, or a promotion that would compare the
    incomparable."""


def connect(tracking_uri: Optional[str] = None) -> Any:
    """An ``MlflowClient`` for ``tracking_uri`` (default: ``default_tracking_uri()``).

    A SQLite store that does not exist is an error, not a new empty database.
    """
    from mlflow.tracking import MlflowClient

    from tracking.tracker import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not path.is_file():
            raise RegistryError(
                f"no MLflow store at {path} (tracking URI {uri}); run `layerwise run` first, "
                "or point --tracking-uri / MLFLOW_TRACKING_URI / LAYERWISE_HOME at the store")
    return MlflowClient(uri)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the MLflow client; turn its failures into one-line ``RegistryError``s."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        raise down_or(exc, exc.message) from None


def down_or(exc: BaseException, message: str) -> RegistryError:
    """A ``RegistryError`` saying the tracking server does not answer, when that is what
    ``exc`` is (``runtime.faults.unreachable``), else one with ``message``."""
    from runtime.faults import unreachable

    reason = unreachable(exc)
    if reason is None:
        return RegistryError(message)
    return RegistryError(f"the MLflow tracking server does not answer ({reason}): start it, "
                         "or point --tracking-uri / MLFLOW_TRACKING_URI at one that does")


def search_runs(client: Any, experiment_ids: list[str], filter_string: str,
            order_by: list[str], limit: Optional[int] = None, what: str = "filter") -> list:
    """``search_runs`` over every page (or the first ``limit`` runs)."""
    from mlflow.exceptions import MlflowException

    runs, token = [], None
    while limit is None or len(runs) < limit:
        size = PAGE if limit is None else min(PAGE, limit - len(runs))
        try:
            page = client.search_runs(experiment_ids, filter_string, max_results=size,
                                      order_by=order_by, page_token=token)
        except MlflowException as exc:
            raise down_or(exc, f"bad {what}: {exc.message}") from None
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


def paged(search: Any, *args: Any) -> list:
    items, token = [], None
    while True:
        page = call(search, *args, max_results=100, page_token=token)
        items += list(page)
        token = page.token
        if not token:
            return items


def try_run(client: Any, run_id: Optional[str]) -> Any:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def timestamp(ms: Optional[int]) -> Optional[pd.Timestamp]:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def duration(info: Any) -> Optional[float]:
    if info.start_time and info.end_time and info.status != "RUNNING":
        return (info.end_time - info.start_time) / 1000
    return None


def to_int(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def to_float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def quote(text: str) -> str:
    return text.replace("'", "\\'")
