"""Read the MLflow record that ``layerwise run`` writes, and promote a registered model.

Plain functions over ``MlflowClient`` and pandas: they return DataFrames and dicts, print
nothing, and raise ``RegistryError`` (one actionable line) for an unknown experiment, run or
model. ``cli/registry.py`` prints them. What they read is the contract in the README,
"How a run is recorded (MLflow)".
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pandas as pd

from runtime.errors import LayerwiseError

KIND_TAG, STAGE_TAG, CACHED_TAG = "layerwise.kind", "layerwise.stage", "layerwise.cached"
PID_TAG, HOST_TAG = "layerwise.pid", "layerwise.host"
ARTIFACTS_FROM_TAG = "layerwise.artifacts_from"  # identical artifacts kept by an earlier run
ARM_TAG = "layerwise.arm"  # a fine-tuning arm's run: pretrained | random
PARENT_TAG = "mlflow.parentRunId"
KINDS = ("pipeline", "ablation")
KEY_PARAMS = ("model.hidden_sizes", "pretrain.corruption_levels", "runtime.seed")
TEST_METRICS = {"test_error_pretrained": "test/error_pretrained",
                "test_error_random": "test/error_random"}
CHAMPION = "champion"
DEFAULT_MODEL = "layerwise-classifier"
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


# ---------------------------------------------------------------------------------------
# lookups


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``; ``RegistryError`` naming the known ones if absent."""
    exp = _call(client.get_experiment_by_name, name)
    if exp is None:
        known = sorted(e.name for e in _call(client.search_experiments))
        raise RegistryError(
            f"unknown experiment {name!r} (known: {', '.join(known) or 'none'}); "
            "see `layerwise runs --experiment NAME`")
    return exp.experiment_id


def get_run(client: Any, run_id: str) -> Any:
    """The run ``run_id``, or the only run whose id starts with it (at least 6 characters)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"cannot read run {run_id!r}: {exc.message}") from None
    matches = []
    if 6 <= len(run_id) < 32 and all(c in "0123456789abcdef" for c in run_id.lower()):
        ids = [e.experiment_id for e in _call(client.search_experiments)]
        matches = _call(client.search_runs, ids, f"attributes.run_id LIKE '{run_id.lower()}%'",
                        max_results=2) if ids else []
    if len(matches) == 1:
        return matches[0]
    what = "is ambiguous" if matches else "not found"
    raise RegistryError(f"run {run_id!r} {what} at {client.tracking_uri}; "
                        "list run ids with `layerwise runs`")


def children(client: Any, run: Any) -> list[Any]:
    """The nested runs of ``run``, in start order."""
    runs = _search(client, [run.info.experiment_id],
                   f"tags.`{PARENT_TAG}` = '{run.info.run_id}'", ["attributes.start_time ASC"])
    return runs


# ---------------------------------------------------------------------------------------
# runs


def list_runs(client: Any, experiment: str = "layerwise", kind: Optional[str] = None,
              filter_string: Optional[str] = None, limit: int = 20) -> pd.DataFrame:
    """The newest parent runs (those tagged ``layerwise.kind``), one row each.

    Args:
        client: An ``MlflowClient``.
        experiment: Experiment name.
        kind: ``pipeline`` or ``ablation``; None for both.
        filter_string: An MLflow search filter ANDed to the above, e.g.
            ``params.runtime.seed = '1'``.
        limit: At most this many runs, newest first.

    Returns:
        Columns ``run_id, kind, preset, start_time`` (UTC), ``duration_s`` (None while
        running), ``status, data_digest``, the key params, ``test_error_pretrained``,
        ``test_error_random`` and ``test_error_diff`` (pretrained - random; NaN if absent).
    """
    if kind is not None and kind not in KINDS:
        raise RegistryError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    exp_id = experiment_id(client, experiment)
    clauses = [f"tags.`{KIND_TAG}` = '{kind}'" if kind else f"tags.`{KIND_TAG}` LIKE '%'"]
    if filter_string and filter_string.strip():
        clauses.append(quote_keys(filter_string.strip()))
    runs = _search(client, [exp_id], " and ".join(clauses), ["attributes.start_time DESC"],
                   limit=limit, what=f"--filter {filter_string!r}")
    rows = []
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        row = {"run_id": run.info.run_id, "kind": run.data.tags.get(KIND_TAG),
               "preset": params.get("preset"), "start_time": _timestamp(run.info.start_time),
               "duration_s": _duration(run.info), "status": run.info.status,
               "data_digest": params.get("data.digest")}
        row.update({key: params.get(key) for key in KEY_PARAMS})
        row.update({col: metrics.get(name, math.nan) for col, name in TEST_METRICS.items()})
        row["test_error_diff"] = metrics.get(
            "test/error_diff", row["test_error_pretrained"] - row["test_error_random"])
        rows.append(row)
    columns = ["run_id", "kind", "preset", "start_time", "duration_s", "status", "data_digest",
               *KEY_PARAMS, *TEST_METRICS, "test_error_diff"]
    return pd.DataFrame(rows, columns=columns)


def quote_keys(filter_string: str) -> str:
    """Backticks around ``metrics.``/``params.``/``tags.`` keys that contain ``/``, which
    MLflow's filter grammar needs (``metrics.test/error_pretrained`` is otherwise an
    "Invalid comparison clause"); keys already quoted are left alone."""
    import re

    return re.sub(r"(?<![`\w])(metrics|params|tags)\.([\w.\-]*/[\w./\-]*)",
                  r"\1.`\2`", filter_string)


def show_run(client: Any, run_id: str) -> dict[str, Any]:
    """Everything about one run: its info, params, final metrics, stages and artifacts.

    Returns:
        ``{"info": dict, "params": dict, "metrics": dict, "stages": DataFrame (stage, run_id,
        status, duration_s, cached), "artifacts": DataFrame (stage, path, size, from_run)}``;
        the artifacts of the run itself have stage ``""``; ``from_run`` names the earlier run
        that holds a stage's identical artifacts (tag ``layerwise.artifacts_from``), else None.
    """
    run = get_run(client, run_id)
    exp_id = run.info.experiment_id
    kids = children(client, run)
    info = {"run_id": run.info.run_id, "name": run.info.run_name,
            "experiment": _call(client.get_experiment, run.info.experiment_id).name,
            "kind": run.data.tags.get(KIND_TAG) or run.data.tags.get(STAGE_TAG),
            "status": run.info.status, "start_time": _timestamp(run.info.start_time),
            "end_time": _timestamp(run.info.end_time), "duration_s": _duration(run.info),
            "parent_run_id": run.data.tags.get(PARENT_TAG),
            "model_version": run.data.tags.get("layerwise.model_version")}
    stages = pd.DataFrame(
        [{"stage": _stage(k), "run_id": k.info.run_id, "status": k.info.status,
          "duration_s": _duration(k.info), "cached": k.data.tags.get(CACHED_TAG) == "true"}
         for k in kids], columns=["stage", "run_id", "status", "duration_s", "cached"])
    artifacts = []
    for stage, holder in [("", run), *((_stage(k), k) for k in kids)]:
        # a rerun with identical artifacts points at the earlier run that holds them
        source = holder.data.tags.get(ARTIFACTS_FROM_TAG)
        artifacts += [{"stage": stage, "path": path, "size": size, "from_run": source}
                      for path, size in list_artifacts(client, source or holder.info.run_id,
                                                       exp_id)]
    return {"info": info, "params": dict(sorted(run.data.params.items())),
            "metrics": dict(sorted(run.data.metrics.items())), "stages": stages,
            "artifacts": pd.DataFrame(artifacts, columns=["stage", "path", "size",
                                                          "from_run"])}


def list_artifacts(client: Any, run_id: str, experiment_id: Optional[str] = None
                   ) -> list[tuple[str, Optional[int]]]:
    """Every artifact file of a run, recursively: ``(path, size in bytes)``; then the files
    of the MLflow models it logged (MLflow 3 keeps them apart from the run's artifacts), as
    ``models:/<model_id>/<path>``."""
    out = _walk(lambda path: client.list_artifacts(run_id, path))
    if experiment_id is not None and hasattr(client, "search_logged_models"):
        models = _call(client.search_logged_models, [experiment_id],
                       filter_string=f"source_run_id = '{run_id}'")
        for model in models:
            out += [(f"models:/{model.model_id}/{path}", size) for path, size in _walk(
                lambda path, m=model.model_id: client.list_logged_model_artifacts(m, path))]
    return out


def _walk(list_dir: Any, path: Optional[str] = None) -> list[tuple[str, Optional[int]]]:
    out = []
    for item in _call(list_dir, path):
        if item.is_dir:
            out += _walk(list_dir, item.path)
        else:
            out.append((item.path, item.file_size))
    return out


def compare_runs(client: Any, run_ids: Sequence[str]) -> dict[str, Any]:
    """Runs side by side; deltas are relative to the first run.

    Metrics are each run's own final metrics (listed first), then its stages' final metrics
    (``finetune/<arm>/...``, ``pretrain/layer_<k>/...``) where the run has none of that name.
    Each fine-tuning arm's run logs ``finetune/<name>`` (tag ``layerwise.arm``); here they
    read ``finetune/<arm>/<name>`` so that the two arms stay apart.

    Returns:
        ``{"run_ids": [full ids], "params": DataFrame (index param, one column per run: only
        the params whose values differ; None where a run lacks it), "metrics": DataFrame (index
        metric, one column per run), "deltas": DataFrame (index metric, one column per run
        after the first: value - first value)}``.
    """
    if len(run_ids) < 2:
        raise RegistryError("compare needs at least two run ids; list them with `layerwise runs`")
    runs = [get_run(client, r) for r in run_ids]
    ids = [r.info.run_id for r in runs]
    params = pd.DataFrame({i: pd.Series(r.data.params, dtype=object) for i, r in zip(ids, runs)})
    params = params.astype(object).where(params.notna(), None)
    differ = params.apply(lambda row: len(set(row.tolist())) > 1, axis=1)
    params = params[differ].sort_index() if len(params) else params
    metrics, own = {}, set()
    for run_id, run in zip(ids, runs):
        values = {}
        for kid in children(client, run):
            values.update(_arm_metrics(kid))
        values.update(run.data.metrics)
        metrics[run_id] = values
        own |= set(run.data.metrics)
    metrics = pd.DataFrame(metrics, columns=ids)
    metrics = metrics.loc[sorted(metrics.index, key=lambda name: (name not in own, name))]
    deltas = metrics[ids[1:]].sub(metrics[ids[0]], axis=0)
    return {"run_ids": ids, "params": params, "metrics": metrics, "deltas": deltas}


# ---------------------------------------------------------------------------------------
# stale runs


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
    for run in _search(client, [exp_id], "attributes.status = 'RUNNING'",
                       ["attributes.start_time DESC"]):
        tags, start = run.data.tags, run.info.start_time or now_ms
        age_h = (now_ms - start) / 3_600_000
        host, pid = tags.get(HOST_TAG), _int(tags.get(PID_TAG))
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
                         "start_time": _timestamp(run.info.start_time), "age_h": age_h,
                         "reason": reason})
    df = pd.DataFrame(rows, columns=["run_id", "name", "stage", "parent_run_id", "host", "pid",
                                     "start_time", "age_h", "reason"])
    return df.astype({"pid": "Int64"})


def mark_failed(client: Any, run_ids: Iterable[str]) -> list[str]:
    """End the given runs as FAILED (``set_terminated``); returns their ids."""
    done = []
    for run_id in run_ids:
        _call(client.set_terminated, run_id, "FAILED")
        done.append(run_id)
    return done


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


# ---------------------------------------------------------------------------------------
# models


def list_models(client: Any, name: Optional[str] = None) -> pd.DataFrame:
    """Registered models and their versions, newest version first within each model.

    The test error of a version is its tag ``test_error``, else the metric
    ``test/error_pretrained`` of its pipeline run (tag ``layerwise.run_id``, else the parent
    of the version's ``evaluate`` run), else of the version's run itself.

    Returns:
        Columns ``name, version`` (int), ``aliases`` (list), ``test_error``,
        ``test_error_source`` (tag | parent | run | None), ``data_digest, run_id`` (the
        pipeline run), ``created`` (UTC), ``status``.
    """
    if name is not None:
        models = [_registered_model(client, name)]
    else:
        models = _paged(client.search_registered_models)
    rows = []
    for model in sorted(models, key=lambda m: m.name):
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = _paged(client.search_model_versions, f"name = '{_quote(model.name)}'")
        for mv in sorted(versions, key=lambda v: -int(v.version)):
            error, source, digest, parent = _version_record(client, mv)
            rows.append({"name": model.name, "version": int(mv.version),
                         "aliases": sorted(aliases.get(str(mv.version), [])),
                         "test_error": error, "test_error_source": source,
                         "data_digest": digest, "run_id": parent,
                         "created": _timestamp(mv.creation_timestamp), "status": mv.status})
    return pd.DataFrame(rows, columns=["name", "version", "aliases", "test_error",
                                       "test_error_source", "data_digest", "run_id",
                                       "created", "status"])


def promote(client: Any, name: str = DEFAULT_MODEL, version: Optional[int] = None,
            force: bool = False, alias: str = CHAMPION) -> dict[str, Any]:
    """Point alias ``champion`` at a version of model ``name``.

    Without ``version`` the candidates are the versions trained on the same data digest as
    the newest version, and the lowest test error wins (ties: the current champion, then
    the newest). Test errors on different data are not comparable, so if the current
    champion was trained on another digest this refuses unless ``force``; with ``force``
    every version is a candidate.

    Returns:
        ``{"name", "version", "test_error", "data_digest", "previous" (version or None),
        "changed", "candidates" (versions compared), "excluded" (versions left out: other
        digest or no test error)}``.
    """
    table = list_models(client, name)
    if table.empty:
        raise RegistryError(f"model {name!r} has no versions; register one with `layerwise run`")
    champion = table[table["aliases"].map(lambda a: alias in a)]
    previous = int(champion["version"].iloc[0]) if len(champion) else None
    if version is not None:
        chosen = table[table["version"] == int(version)]
        if chosen.empty:
            raise RegistryError(
                f"model {name!r} has no version {version} (versions: "
                f"{', '.join(str(v) for v in sorted(table['version']))}); see `layerwise models`")
        candidates, excluded = chosen, []
    else:
        newest = table.loc[table["version"].idxmax()]
        if force:
            candidates = table
        else:
            if previous is not None:
                old = champion.iloc[0]
                if (old["data_digest"] or None) != (newest["data_digest"] or None):
                    raise RegistryError(
                        f"{alias} {name} v{previous} was trained on data digest "
                        f"{_short(old['data_digest'])} but the newest version "
                        f"v{newest['version']} on {_short(newest['data_digest'])}: their test "
                        "errors are not comparable. Pass --version V to choose, or --force "
                        "to pick the best across all digests")
            candidates = table[_same_digest(table["data_digest"], newest["data_digest"])]
        candidates = candidates[candidates["test_error"].notna()]
        excluded = sorted(set(table["version"]) - set(candidates["version"]))
        if candidates.empty:
            raise RegistryError(f"no version of {name!r} has a recorded test error to compare; "
                                "pass --version V")
        order = candidates.assign(
            _not_champion=candidates["version"] != (previous or -1),
            _newest=-candidates["version"]).sort_values(["test_error", "_not_champion", "_newest"])
        chosen = order.iloc[[0]]
    row = chosen.iloc[0]
    _call(client.set_registered_model_alias, name, alias, str(int(row["version"])))
    return {"name": name, "alias": alias, "version": int(row["version"]),
            "test_error": float(row["test_error"]), "data_digest": row["data_digest"],
            "run_id": row["run_id"], "previous": previous,
            "changed": previous != int(row["version"]),
            "candidates": sorted(int(v) for v in candidates["version"]),
            "excluded": [int(v) for v in excluded]}


def _registered_model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"cannot read model {name!r}: {exc.message}") from None
    known = sorted(m.name for m in _paged(client.search_registered_models))
    raise RegistryError(f"unknown model {name!r} (registered: {', '.join(known) or 'none'}); "
                        "see `layerwise models`, and `layerwise runs` for the runs that "
                        "register them")


def _version_record(client: Any, mv: Any) -> tuple[float, Optional[str], Optional[str],
                                                   Optional[str]]:
    """(test error, where it came from, data digest, pipeline run id) of a model version."""
    tags = mv.tags or {}
    run = _try_run(client, mv.run_id)
    parent_id = tags.get("layerwise.run_id") or (run.data.tags.get(PARENT_TAG) if run else None)
    parent = _try_run(client, parent_id)
    error, source = math.nan, None
    if _float(tags.get("test_error")) is not None:
        error, source = _float(tags["test_error"]), "tag"
    elif parent is not None and "test/error_pretrained" in parent.data.metrics:
        error, source = parent.data.metrics["test/error_pretrained"], "parent"
    elif run is not None and "test/error_pretrained" in run.data.metrics:
        error, source = run.data.metrics["test/error_pretrained"], "run"
    digest = tags.get("data.digest") or (parent.data.params.get("data.digest") if parent
                                         else None)
    return error, source, digest, parent_id


# ---------------------------------------------------------------------------------------
# helpers


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call the MLflow client; turn its failures into one-line ``RegistryError``s."""
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        raise RegistryError(f"{exc.message}") from None


def _search(client: Any, experiment_ids: list[str], filter_string: str,
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
            raise RegistryError(f"bad {what}: {exc.message}") from None
        runs += list(page)
        token = page.token
        if not token:
            break
    return runs


def _paged(search: Any, *args: Any) -> list:
    items, token = [], None
    while True:
        page = _call(search, *args, max_results=100, page_token=token)
        items += list(page)
        token = page.token
        if not token:
            return items


def _try_run(client: Any, run_id: Optional[str]) -> Any:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _arm_metrics(run: Any) -> dict[str, float]:
    """A stage run's final metrics; an arm's ``finetune/x`` as ``finetune/<arm>/x``."""
    arm = run.data.tags.get(ARM_TAG)
    if not arm:
        return dict(run.data.metrics)
    return {(f"finetune/{arm}/{k.split('/', 1)[1]}" if k.startswith("finetune/") else k): v
            for k, v in run.data.metrics.items()}


def _stage(run: Any) -> str:
    return run.data.tags.get(STAGE_TAG) or run.data.tags.get(KIND_TAG) or run.info.run_name


def _timestamp(ms: Optional[int]) -> Optional[pd.Timestamp]:
    return pd.Timestamp(ms, unit="ms", tz="UTC") if ms else None


def _duration(info: Any) -> Optional[float]:
    if info.start_time and info.end_time and info.status != "RUNNING":
        return (info.end_time - info.start_time) / 1000
    return None


def _int(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def _same_digest(digests: pd.Series, digest: Optional[str]) -> pd.Series:
    return digests.isna() if digest is None else digests == digest


def _short(digest: Optional[str]) -> str:
    return digest[:12] if digest else "(unknown)"
