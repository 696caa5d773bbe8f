"""The main job, as the README's diagram draws it: load the data, pretrain layer by layer,
fine-tune the pretrained and the random-init twins, evaluate both, compare them, register
the pretrained network. The objective (``classify``: the deep classifier; ``reconstruct``:
the deep autoencoder, against PCA) chooses the fine-tuning and evaluation tasks; nothing
else differs. Every stage is a Prefect task recorded in its own nested MLflow run under
one parent run (``tracking.recorder``)."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

from prefect import flow
from pydantic import BaseModel

from config.parameters import complete, resolve_flow_config
from config.stages import PipelineConfig
from runtime.home import layerwise_home
from runtime.errors import ConfigError
from tasks.compare import Comparison, compare
from tasks.data import check_sizes, load_data_task
from tasks.evaluate import evaluate_task, per_class_table
from tasks.finetune import ARMS, finetune_twins_task
from tasks.pretrain import pretrain_layer_task
from tasks.reconstruct import finetune_autoencoders_task
from tasks.reconstruct_eval import METHODS, evaluate_reconstruction_task
from tasks.release import release_task
from tracking.conventions import run_name
from tracking.recorder import PipelineRecorder, StageReport
from tracking.registration import Registered
from tracking.tracker import Tracker
from tracking.vocabulary import (AUTOENCODER_MODEL, CLASSIFIER_MODEL, ENCODER_MODEL,
                                 KNN_ACCURACY, RECON_ERROR, RECON_ERROR_DIFF, RECON_LOSS,
                                 TEST_ERROR_DIFF, TEST_ERROR_PRETRAINED, TEST_ERROR_RANDOM,
                                 VAL_ERROR_PRETRAINED)


class PipelineResult(BaseModel):
    """What ``layerwise run`` prints and tests check (objective ``classify``)."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    test_error_pretrained: float
    test_error_random: float
    test_error_diff: float
    model_name: str
    model_version: Optional[str]  # None: not registered (see not_registered)
    model_reused: bool = False  # an identical version (same weights and data) existed
    not_registered: Optional[str] = None  # why the model was not registered
    data: dict[str, Any]
    stages: list[StageReport]


class ReconstructResult(BaseModel):
    """What ``layerwise run --objective reconstruct`` prints and tests check."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    recon_error: dict[str, float]  # method -> squared error per test image
    recon_loss: dict[str, float]  # method -> the fine-tuning loss on the test images
    knn_accuracy: dict[str, float]  # method -> k-NN accuracy of its code
    recon_error_diff: float  # pretrained − random
    val_error_pretrained: float
    model_versions: dict[str, str]  # registered name -> version
    models_reused: bool = False
    data: dict[str, Any]
    stages: list[StageReport]


class Objective(NamedTuple):
    """What an objective chooses: its fine-tuning and evaluation tasks, and its result."""

    finetune: Any
    evaluate: Any
    result: Any  # (recorder, data, comparison, registered, names) -> its result


def flow_run_name() -> str:
    """The Prefect flow run's name: the MLflow parent run's, ``<preset>-s<seed>-<UTC mmdd-HHMMSS>``."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    try:
        config, preset, _ = resolve_flow_config(params.get("config"), params.get("preset"),
                                                params.get("overrides") or [])
    except (ConfigError, ValueError, TypeError):  # the flow itself reports the mistake
        return run_name(str(params.get("preset") or "invalid"), 0)
    return run_name(preset, config.runtime.seed)


@flow(name="layerwise-pipeline", validate_parameters=True, flow_run_name=flow_run_name)
def pipeline(
    config: Optional[PipelineConfig] = None,
    preset: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    tracking_uri: Optional[str] = None,
    experiment: str = "layerwise",
    registered_model_name: Optional[str] = None,
    encoder_model_name: str = ENCODER_MODEL,
    fresh: bool = False,
) -> Any:
    """Greedy layer-wise pretraining vs random initialisation, recorded in MLflow.

    Args:
        config: A complete config (``layerwise config --format json``); None to build it
            from ``preset`` and ``overrides``.
        preset: Preset name (default ``default``); recorded with the overrides relative to it.
        overrides: ``section.field=value`` items, as ``layerwise run --set`` takes them
            (``objective=reconstruct`` for the deep autoencoder).
        tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI`` or the embedded
            store).
        experiment: MLflow experiment name.
        registered_model_name: Registered model the pretrained network joins (default
            ``layerwise-classifier``, or ``layerwise-autoencoder`` for ``reconstruct``).
        encoder_model_name: Registered model the autoencoder's encoder joins.
        fresh: Recompute every stage instead of reusing cached results.

    Returns:
        ``PipelineResult``, or ``ReconstructResult`` for ``objective=reconstruct``.
    """
    config, preset, overrides = setup(config, preset, overrides)
    objective, names = OBJECTIVES[config.objective], model_names(
        config, registered_model_name, encoder_model_name)
    tracker = Tracker(tracking_uri, experiment, source_name="flows/pipeline.py")
    with PipelineRecorder(tracker, config, preset, overrides, fresh, run_label()) as record:
        data = record.stage("load-data", load_data_task, config.data)
        check_sizes(config, data)
        stack = []
        for k in range(config.model.n_layers):
            stack.append(record.stage(f"pretrain-layer-{k + 1}", pretrain_layer_task, k,
                                      config, data, stack, live=f"pretrain/layer_{k + 1}"))
        arms = record.twins(objective.finetune, config, data, stack)
        evaluation = record.stage("evaluate", objective.evaluate, config, data, arms)
        comparison = record.compare(compare(evaluation))
        registered = record.register(release_task(config, data, arms, evaluation), names)
        return objective.result(record, data, comparison, registered, names, evaluation)


def run_label() -> str:
    """The parent run's name: the flow run's (``flow_run_name``)."""
    from prefect.runtime import flow_run

    return flow_run.name or flow_run_name()


def setup(config: Optional[PipelineConfig], preset: Optional[str],
          overrides: Optional[list[str]]) -> tuple[PipelineConfig, str, list[str]]:
    """The flow run's config, preset and overrides (``resolve_flow_config``), with the
    project's own errors logged without tracebacks (also when the flow is served)."""
    from runtime.expected_errors import install

    install()
    return resolve_flow_config(config, preset, overrides or [])


def model_names(config: PipelineConfig, registered: Optional[str], encoder: str
                ) -> dict[str, str]:
    """The registered model each served kind joins (``tasks.release``)."""
    if config.objective == "reconstruct":
        return {"autoencoder": registered or AUTOENCODER_MODEL, "encoder": encoder}
    return {"classifier": registered or CLASSIFIER_MODEL}


def classifier_result(record: PipelineRecorder, data: Any, comparison: Comparison,
                      registered: Registered, names: dict[str, str],
                      evaluation: Any) -> PipelineResult:
    """The classify objective's result; its Prefect summary and last log line."""
    m, version = comparison.metrics, registered.versions.get("classifier")
    model = f"model {names['classifier']} v{version}" if version else "no model registered"
    record.echo(f"{comparison.line}; {model}; MLflow run: {record.link}", console=False)
    result = PipelineResult(
        run_id=record.parent, experiment_id=record.tracker.experiment_id,
        tracking_uri=record.tracker.uri, test_error_pretrained=m[TEST_ERROR_PRETRAINED],
        test_error_random=m[TEST_ERROR_RANDOM], test_error_diff=m[TEST_ERROR_DIFF],
        model_name=names["classifier"], model_version=version,
        model_reused=registered.reused and version is not None,
        not_registered=registered.refused, data=data.summary(), stages=record.reports)
    summary_markdown(result, per_class_table(evaluation))
    return result


def reconstruct_result(record: PipelineRecorder, data: Any, comparison: Comparison,
                       registered: Registered, names: dict[str, str],
                       evaluation: Any) -> ReconstructResult:
    """The reconstruct objective's result and its Prefect summary."""
    m = comparison.metrics
    record.echo(f"{comparison.line}; MLflow run: {record.link}", console=False)
    result = ReconstructResult(
        run_id=record.parent, experiment_id=record.tracker.experiment_id,
        tracking_uri=record.tracker.uri,
        recon_error={k: m[RECON_ERROR.format(k)] for k in METHODS},
        recon_loss={k: m[RECON_LOSS.format(k)] for k in METHODS},
        knn_accuracy={k: m[KNN_ACCURACY.format(k)] for k in METHODS},
        recon_error_diff=m[RECON_ERROR_DIFF], val_error_pretrained=m[VAL_ERROR_PRETRAINED],
        model_versions={names[k]: v for k, v in registered.versions.items()},
        models_reused=registered.reused, data=data.summary(), stages=record.reports)
    reconstruct_summary(result, evaluation.knn_k)
    return result


OBJECTIVES = {
    "classify": Objective(finetune_twins_task, evaluate_task, classifier_result),
    "reconstruct": Objective(finetune_autoencoders_task, evaluate_reconstruction_task,
                             reconstruct_result),
}


def run_pipeline(config: PipelineConfig, **kwargs: Any) -> Any:
    """Run the pipeline flow on ``config`` with its cached task results stored beside the
    checkpoints they point to, under
    ``$LAYERWISE_HOME/prefect-results`` (the flow reads the setting at start)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from runtime.ephemeral_api import api_url, ready
    from tracking.tracker import default_tracking_uri
    from tracking.uri import check_reachable, preflight_mlflow

    preflight_mlflow(kwargs.get("tracking_uri") or default_tracking_uri())
    api = PREFECT_API_URL.value()
    if api and api_url() is None:  # the user's server: make sure it answers before any work
        check_reachable(api.rstrip("/") + "/health", "the Prefect API",
                        "Start the server, or unset PREFECT_API_URL to run ephemeral.")

    # Every run needs these, cached or not (the stages, evaluation, the logged model);
    # imported here, their ~5 s overlap the boot of the ephemeral Prefect server that the
    # CLI started in the background, which ready() then waits for.
    import lightning  # noqa: F401
    import mlflow.pytorch  # noqa: F401

    ready()
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: layerwise_home() / "prefect-results"}):
        return pipeline(config=complete(config), **kwargs)


def summary_markdown(result: PipelineResult, per_class: Any) -> str:
    """A Prefect markdown artifact summarising the run; returns the markdown."""
    from prefect.artifacts import create_markdown_artifact

    lines = [
        "# layerwise pipeline", "",
        "| init | test error |", "| --- | --- |",
        f"| pretrained | {100 * result.test_error_pretrained:.2f} % |",
        f"| random | {100 * result.test_error_random:.2f} % |",
        f"| difference (pretrained − random) | {100 * result.test_error_diff:+.2f} pp |", "",
        f"MLflow run `{result.run_id}` at `{result.tracking_uri}`; "
        + (f"model `{result.model_name}` v{result.model_version}" if result.model_version
           else f"model not registered: {result.not_registered}")
        + f"; data digest `{result.data['digest'][:16]}`.",
        "", "| stage | seconds | cached |", "| --- | --- | --- |",
        *[f"| {s.name} | {s.seconds:.1f} | {s.cached} |" for s in result.stages], "",
        "Per-class test error (%):", "", "| class | pretrained | random |",
        "| --- | --- | --- |",
        *[f"| {c} | {100 * row.pretrained:.2f} | {100 * row.random:.2f} |"
          for c, row in per_class.iterrows()],
    ]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown, key="layerwise-pipeline-summary",
                             description="Test error of the pretrained and random-init twins")
    return markdown


def reconstruct_summary(result: ReconstructResult, knn_k: int) -> str:
    """A Prefect markdown artifact summarising the run; returns the markdown."""
    from prefect.artifacts import create_markdown_artifact

    lines = [
        "# layerwise deep autoencoder", "",
        f"| method | squared error per test image | loss | {knn_k}-NN accuracy of the code |",
        "| --- | --- | --- | --- |",
        *[f"| {m} | {result.recon_error[m]:.3f} | {result.recon_loss[m]:.3f} | "
          f"{100 * result.knn_accuracy[m]:.2f} % |" for m in METHODS], "",
        f"Difference (pretrained − random): {result.recon_error_diff:+.3f}. MLflow run "
        f"`{result.run_id}` at `{result.tracking_uri}`; models "
        + ", ".join(f"`{n}` v{v}" for n, v in result.model_versions.items())
        + f"; data digest `{result.data['digest'][:16]}`.",
        "", "| stage | seconds | cached |", "| --- | --- | --- |",
        *[f"| {s.name} | {s.seconds:.1f} | {s.cached} |" for s in result.stages],
    ]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown, key="layerwise-reconstruct-summary",
                             description="Reconstruction error of the pretrained and "
                             "random-init autoencoders and PCA")
    return markdown


__all__ = ["pipeline", "run_pipeline", "PipelineResult", "ReconstructResult", "ARMS"]
