"""Registered models: their versions with validation and test error and data digest, and
the alias ``champion`` (``layerwise models``, ``layerwise promote``).

``promote`` selects on the validation error and only reports the test error beside it:
choosing by test error would make the test set part of model selection."""

from __future__ import annotations

import math
from typing import Any, Optional

import pandas as pd

from tracking.client import RegistryError, call, paged, quote, timestamp, to_float, try_run
from tracking.vocabulary import (CLASSIFIER_MODEL, PARENT_TAG, TEST_ERROR_PRETRAINED,
                                 VAL_ERROR_PRETRAINED)

CHAMPION = "champion"


def list_models(client: Any, name: Optional[str] = None) -> pd.DataFrame:
    """Registered models and their versions, newest version first within each model.

    The test error of a version is its tag ``test_error``, else the metric
    ``test/error_pretrained`` of its pipeline run (tag ``layerwise.run_id``, else the parent
    of the version's ``evaluate`` run), else of the version's run itself. Its validation
    error (the pretrained arm's best validation error, or validation reconstruction error
    for an autoencoder) is likewise its tag ``val_error``, else the metric
    ``valid/error_pretrained`` of its pipeline run or of its own run.

    Returns:
        Columns ``name, version`` (int), ``aliases`` (list), ``val_error``,
        ``val_error_source`` and ``test_error``, ``test_error_source`` (tag | parent | run
        | None), ``data_digest, run_id`` (the pipeline run), ``created`` (UTC),
        ``status``.
    """
    if name is not None:
        models = [_registered_model(client, name)]
    else:
        models = paged(client.search_registered_models)
    rows = []
    for model in sorted(models, key=lambda m: m.name):
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = paged(client.search_model_versions, f"name = '{quote(model.name)}'")
        for mv in sorted(versions, key=lambda v: -int(v.version)):
            errors, digest, parent = _version_record(client, mv)
            rows.append({"name": model.name, "version": int(mv.version),
                         "aliases": sorted(aliases.get(str(mv.version), [])), **errors,
                         "data_digest": digest, "run_id": parent,
                         "created": timestamp(mv.creation_timestamp), "status": mv.status})
    return pd.DataFrame(rows, columns=["name", "version", "aliases", "val_error",
                                       "val_error_source", "test_error",
                                       "test_error_source", "data_digest", "run_id",
                                       "created", "status"])


def promote(client: Any, name: str = CLASSIFIER_MODEL, version: Optional[int] = None,
            force: bool = False, alias: str = CHAMPION) -> dict[str, Any]:
    """Point alias ``champion`` at a version of model ``name``.

    Without ``version`` the candidates are the versions trained on the same data digest as
    the newest version, and the lowest VALIDATION error wins (ties: the current champion,
    then the newest); the test error is reported beside it and takes no part in the
    choice. Errors on different data are not comparable, so if the current champion was
    trained on another digest this refuses unless ``force``; with ``force`` every version
    is a candidate.

    Returns:
        ``{"name", "version", "val_error", "test_error", "data_digest", "previous"
        (version or None), "changed", "candidates" (versions compared), "excluded"
        (versions left out: other digest or no validation error)}``.
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
        candidates = candidates[candidates["val_error"].notna()]
        excluded = sorted(set(table["version"]) - set(candidates["version"]))
        if candidates.empty:
            raise RegistryError(f"no version of {name!r} has a recorded validation error to "
                                "compare; pass --version V")
        # Selection reads the validation error only: the test error never enters the sort.
        order = candidates[["version", "val_error"]].assign(
            _not_champion=candidates["version"] != (previous or -1),
            _newest=-candidates["version"]).sort_values(["val_error", "_not_champion", "_newest"])
        chosen = table[table["version"] == int(order.iloc[0]["version"])]
    row = chosen.iloc[0]
    call(client.set_registered_model_alias, name, alias, str(int(row["version"])))
    return {"name": name, "alias": alias, "version": int(row["version"]),
            "val_error": float(row["val_error"]), "test_error": float(row["test_error"]),
            "data_digest": row["data_digest"],
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
    known = sorted(m.name for m in paged(client.search_registered_models))
    raise RegistryError(f"unknown model {name!r} (registered: {', '.join(known) or 'none'}); "
                        "see `layerwise models`, and `layerwise runs` for the runs that "
                        "register them")


def _version_record(client: Any, mv: Any) -> tuple[dict[str, Any], Optional[str],
                                                   Optional[str]]:
    """({val_error, val_error_source, test_error, test_error_source}, data digest,
    pipeline run id) of a model version."""
    tags = mv.tags or {}
    run = try_run(client, mv.run_id)
    parent_id = tags.get("layerwise.run_id") or (run.data.tags.get(PARENT_TAG) if run else None)
    parent = try_run(client, parent_id)
    errors: dict[str, Any] = {}
    for split, tag, metric in (("val", "val_error", VAL_ERROR_PRETRAINED),
                               ("test", "test_error", TEST_ERROR_PRETRAINED)):
        error, source = math.nan, None
        if to_float(tags.get(tag)) is not None:
            error, source = to_float(tags[tag]), "tag"
        elif parent is not None and metric in parent.data.metrics:
            error, source = parent.data.metrics[metric], "parent"
        elif run is not None and metric in run.data.metrics:
            error, source = run.data.metrics[metric], "run"
        errors.update({f"{split}_error": error, f"{split}_error_source": source})
    digest = tags.get("data.digest") or (parent.data.params.get("data.digest") if parent
                                         else None)
    return errors, digest, parent_id


def _same_digest(digests: pd.Series, digest: Optional[str]) -> pd.Series:
    return digests.isna() if digest is None else digests == digest


def _short(digest: Optional[str]) -> str:
    return digest[:12] if digest else "(unknown)"
