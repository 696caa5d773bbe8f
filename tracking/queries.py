"""Read the MLflow record that ``layerwise run`` writes: runs, their stages and artifacts,
and runs side by side.

Plain functions over ``MlflowClient`` and pandas: they return DataFrames and dicts, print
nothing, and raise ``RegistryError`` (one actionable line) for an unknown experiment or run.
``cli/registry.py`` prints them; stale runs are in ``tracking/stale.py``, registered models
in ``tracking/model_registry.py``. What they read is the contract in docs/recording.md.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import pandas as pd

from tracking.client import RegistryError, call, duration, search_runs, timestamp
from tracking.vocabulary import (ARM_TAG, ARTIFACTS_FROM_TAG, CACHED_TAG, CELL_TAG, KIND_TAG,
                                 KINDS, LAYER_TAG, PARENT_TAG, STAGE_TAG, TEST_ERROR_DIFF,
                                 TEST_METRICS)

KEY_PARAMS = ("model.hidden_sizes", "pretrain.corruption_levels", "runtime.seed")


def experiment_id(client: Any, name: str) -> str:
    """The id of experiment ``name``; ``RegistryError`` naming the known ones if absent."""
    exp = call(client.get_experiment_by_name, name)
    if exp is None:
        known = sorted(e.name for e in call(client.search_experiments))
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
        ids = [e.experiment_id for e in call(client.search_experiments)]
        matches = call(client.search_runs, ids, f"attributes.run_id LIKE '{run_id.lower()}%'",
                        max_results=2) if ids else []
    if len(matches) == 1:
        return matches[0]
    what = "is ambiguous" if matches else "not found"
    raise RegistryError(f"run {run_id!r} {what} at {client.tracking_uri}; "
                        "list run ids with `layerwise runs`")


def children(client: Any, run: Any) -> list[Any]:
    """The nested runs of ``run``, in start order."""
    runs = search_runs(client, [run.info.experiment_id],
                   f"tags.`{PARENT_TAG}` = '{run.info.run_id}'", ["attributes.start_time ASC"])
    return runs


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
    runs = search_runs(client, [exp_id], " and ".join(clauses), ["attributes.start_time DESC"],
                   limit=limit, what=f"--filter {filter_string!r}")
    rows = []
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        row = {"run_id": run.info.run_id, "kind": run.data.tags.get(KIND_TAG),
               "preset": params.get("preset"), "start_time": timestamp(run.info.start_time),
               "duration_s": duration(run.info), "status": run.info.status,
               "data_digest": params.get("data.digest")}
        row.update({key: params.get(key) for key in KEY_PARAMS})
        row.update({col: metrics.get(name, math.nan) for col, name in TEST_METRICS.items()})
        row["test_error_diff"] = metrics.get(
            TEST_ERROR_DIFF, row["test_error_pretrained"] - row["test_error_random"])
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


def _seconds(child: Any) -> Optional[float]:
    """A child run's seconds: its wall time, but for an ablation's cell or layer, whose run is
    open from the start of the ablation to its settling, the training time it logged."""
    if CELL_TAG in child.data.tags or LAYER_TAG in child.data.tags:
        trained = [v for k, v in child.data.metrics.items() if k.endswith("/train_seconds")]
        return float(trained[0]) if trained else None
    return duration(child.info)


def show_run(client: Any, run_id: str) -> dict[str, Any]:
    """Everything about one run: its info, params, final metrics, stages and artifacts.

    Returns:
        ``{"info": dict, "params": dict, "metrics": dict, "stages": DataFrame (stage, run_id,
        status, duration_s, cached), "artifacts": DataFrame (stage, path, size, from_run)}``;
        the artifacts of the run itself carry its own stage (or kind: ``pipeline``); ``from_run`` names the earlier run
        that holds a stage's identical artifacts (tag ``layerwise.artifacts_from``), else None.
    """
    run = get_run(client, run_id)
    exp_id = run.info.experiment_id
    kids = children(client, run)
    info = {"run_id": run.info.run_id, "name": run.info.run_name,
            "experiment": call(client.get_experiment, run.info.experiment_id).name,
            "kind": run.data.tags.get(KIND_TAG) or run.data.tags.get(STAGE_TAG),
            "status": run.info.status, "start_time": timestamp(run.info.start_time),
            "end_time": timestamp(run.info.end_time), "duration_s": duration(run.info),
            "parent_run_id": run.data.tags.get(PARENT_TAG),
            "model_version": run.data.tags.get("layerwise.model_version")}
    stages = pd.DataFrame(
        [{"stage": _stage(k), "run_id": k.info.run_id, "status": k.info.status,
          "duration_s": _seconds(k), "cached": k.data.tags.get(CACHED_TAG) == "true"}
         for k in kids], columns=["stage", "run_id", "status", "duration_s", "cached"])
    artifacts = []
    for stage, holder in [(_stage(run), run), *((_stage(k), k) for k in kids)]:
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
        models = call(client.search_logged_models, [experiment_id],
                       filter_string=f"source_run_id = '{run_id}'")
        for model in models:
            out += [(f"models:/{model.model_id}/{path}", size) for path, size in _walk(
                lambda path, m=model.model_id: client.list_logged_model_artifacts(m, path))]
    return out


def _walk(list_dir: Any, path: Optional[str] = None) -> list[tuple[str, Optional[int]]]:
    out = []
    for item in call(list_dir, path):
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


def _arm_metrics(run: Any) -> dict[str, float]:
    """A stage run's final metrics; an arm's ``finetune/x`` as ``finetune/<arm>/x``."""
    arm = run.data.tags.get(ARM_TAG)
    if not arm:
        return dict(run.data.metrics)
    return {(f"finetune/{arm}/{k.split('/', 1)[1]}" if k.startswith("finetune/") else k): v
            for k, v in run.data.metrics.items()}


def _stage(run: Any) -> str:
    return run.data.tags.get(STAGE_TAG) or run.data.tags.get(KIND_TAG) or run.info.run_name
