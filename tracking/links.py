"""Where a user opens an MLflow run: its page in the tracking server's UI, or, for an
embedded store, its id and the command that opens that store."""

from __future__ import annotations

import json
import shlex

#: The MLflow UI (3.x) opens every experiment in its GenAI view unless the link, or the
#: browser's last choice, asks for its model-training view ("GenAI | Model training").
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def mlflow_ui_command(tracking_uri: str) -> str:
    """The shell command that opens an embedded store in the MLflow UI, its URI quoted
    (a ``LAYERWISE_HOME`` with spaces or quotes pastes as one argument)."""
    return f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's UI URL when the tracking URI is a server (http/https), else its id, the
    store's URI and how to open it.

    Args:
        tracking_uri: The MLflow tracking URI the run was written to.
        experiment_id: The run's experiment.
        run_id: The run.
    """
    if tracking_uri.startswith(("http://", "https://")):
        return (f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
                f"?{MODEL_TRAINING_VIEW}")
    how = (f"; open it with `{mlflow_ui_command(tracking_uri)}`"
           if tracking_uri.startswith("sqlite:") else "")
    return f"run {run_id} in {tracking_uri}{how}"


def compare_link(experiment_id: str, run_ids: list[str]) -> str:
    """The MLflow UI's comparison view of ``run_ids`` (their metrics' curves overlaid in its
    charts), as a link relative to the UI's page, for a run's Markdown description."""
    from urllib.parse import quote

    runs, experiments = (json.dumps(v, separators=(",", ":")) for v in (run_ids, [experiment_id]))
    return (f"#/compare-runs?runs={quote(runs, safe='')}&experiments="
            f"{quote(experiments, safe='')}&{MODEL_TRAINING_VIEW}")


def model_version_link(name: str, version: str) -> str:
    """A registered model version's page in the MLflow UI, relative to the UI's page."""
    from urllib.parse import quote

    return f"#/models/{quote(name, safe='')}/versions/{version}"
