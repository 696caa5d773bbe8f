"""The main job: load data, pretrain layer by layer, fine-tune the pretrained and the
random-init twins, evaluate both. Every stage is a Prefect task with its own nested MLflow
run under one parent run."""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow
from pydantic import BaseModel

from config.parameters import complete, resolve_flow_config
from config.stages import PipelineConfig, flatten
from flows.stages import (StageRecorder, StageReport, data_and_pretraining, flow_run_name,
                          run_task)
from runtime.console import announce
from runtime.devices import eval_device, precision_used
from runtime.home import layerwise_home
from runtime.errors import ConfigError
from tasks.evaluate import ARMS, evaluate_task, per_class_table
from tasks.finetune import finetune_twins_task
from tracking.conventions import results_note, run_description, run_name
from tracking.links import run_link
from tracking.records import log_classifier_run, log_evaluation
from tracking.stale import end_dead_runs
from tracking.tracker import Tracker, environment_params
from tracking.vocabulary import (KIND_TAG, NOT_REGISTERED_TAG, NOTE_TAG, TEST_ERROR_DIFF,
                                 TEST_ERROR_PRETRAINED, TEST_ERROR_RANDOM)


class PipelineResult(BaseModel):
    """What ``layerwise run`` prints and tests check."""

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


@flow(name="layerwise-pipeline", validate_parameters=True, flow_run_name=flow_run_name)
def pipeline(
    config: Optional[PipelineConfig] = None,
    preset: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    tracking_uri: Optional[str] = None,
    experiment: str = "layerwise",
    registered_model_name: str = "layerwise-classifier",
    fresh: bool = False,
) -> PipelineResult:
    """Greedy layer-wise pretraining vs random initialisation, recorded in MLflow.

    Args:
        config: A complete config (``layerwise config --format json``); None to build it
            from ``preset`` and ``overrides``.
        preset: Preset name (default ``default``); recorded with the overrides relative to it.
        overrides: ``section.field=value`` items, as ``layerwise run --set`` takes them.
        tracking_uri: MLflow tracking URI (default: ``$MLFLOW_TRACKING_URI`` or the embedded
            store).
        experiment: MLflow experiment name.
        registered_model_name: Registered model that the pretrained classifier joins.
        fresh: Recompute every stage instead of reusing cached results.
    """
    from prefect.runtime import flow_run

    from runtime.expected_errors import install

    install()  # the project's own errors are logged without tracebacks (also when served)
    echo = announce  # printed, and in the flow run's logs in the Prefect UI
    config, preset, overrides = resolve_flow_config(config, preset, overrides or [])
    if config.objective != "classify":
        raise ConfigError("objective='reconstruct' runs in the flow layerwise-reconstruct "
                          "(flows/reconstruct.py; `layerwise run` picks it by itself)")
    tracker = Tracker(tracking_uri, experiment, source_name="flows/pipeline.py")
    if killed := end_dead_runs(tracker.client, experiment):
        echo(f"  marked {len(killed)} MLflow run(s) of an earlier, killed attempt KILLED")
    device = str(eval_device(config.runtime))
    name = flow_run.name or run_name(preset, config.runtime.seed)
    description = run_description("pipeline", preset, config)
    with tracker.run(name, {KIND_TAG: "pipeline", NOTE_TAG: description}) as parent:
        link = run_link(tracker.uri, tracker.experiment_id, parent)
        echo(f"MLflow run: {link}", console=False)
        tracker.log_params(parent, {**flatten(config), "preset": preset,
                                    "overrides": overrides,
                                    **environment_params(device, precision_used(config.runtime))})
        stages = StageRecorder(tracker, parent, echo)

        data, stack = data_and_pretraining(config, tracker, parent, stages, fresh)

        # The twins fine-tune as one population of two (one pass over the data, the same
        # data order by construction); each arm keeps its own run, open while they train.
        results = {}
        with stages.together([f"finetune-{arm}" for arm in ARMS], "finetune",
                             "finetune-twins") as runs:
            info = runs[0][1]
            twins = run_task(finetune_twins_task, "finetune-twins", fresh, info, config, data,
                             stack)
            for arm, (run, arm_info) in zip(ARMS, runs):
                arm_info["cached"] = info["cached"]
                results[arm] = twins.arms[arm]
                arm_info["artifacts_from"] = log_classifier_run(
                    tracker, run, results[arm], history=run not in info["live"])

        with stages.stage("evaluate") as (run, info):
            evaluation = run_task(evaluate_task, "evaluate", fresh, info, config, data, results)
            metrics, version, model_reused, info["artifacts_from"], refused = log_evaluation(
                tracker, run, parent, evaluation, results, config, data, registered_model_name)
        tracker.log_metrics(parent, metrics)
        reused = stages.reused_note(registered_model_name, version, model_reused)
        arm_runs = [r.mlflow_run_id for r in stages.reports if r.name.startswith("finetune-")]
        registered = ({"layerwise.model_version": version,
                       "layerwise.registered_model": f"{registered_model_name}/{version}",
                       NOTE_TAG: description + "\n\n" + results_note(
                           tracker.experiment_id, arm_runs, registered_model_name, version)}
                      if version else {NOT_REGISTERED_TAG: refused})
        tracker.set_tags(parent, {**registered,
                                  **({"layerwise.reused": reused} if reused else {})})
        if reused:
            echo(f"  reused {reused}")
        if refused:
            echo(f"warning: model {registered_model_name} not registered: {refused}")
        model = f"model {registered_model_name} v{version}" if version else "no model registered"
        echo(f"test error: pretrained {100 * metrics[TEST_ERROR_PRETRAINED]:.2f} %, random "
             f"{100 * metrics[TEST_ERROR_RANDOM]:.2f} %; {model}; MLflow run: {link}",
             console=False)
        result = PipelineResult(
            run_id=parent, experiment_id=tracker.experiment_id, tracking_uri=tracker.uri,
            test_error_pretrained=metrics[TEST_ERROR_PRETRAINED],
            test_error_random=metrics[TEST_ERROR_RANDOM],
            test_error_diff=metrics[TEST_ERROR_DIFF],
            model_name=registered_model_name, model_version=version, model_reused=model_reused,
            not_registered=refused,
            data=data.summary(), stages=stages.reports,
        )
        summary_markdown(result, per_class_table(evaluation))
    return result


def run_pipeline(config: PipelineConfig, **kwargs: Any) -> Any:
    """Run the flow of ``config.objective`` (this module's ``pipeline``, or
    ``flows.reconstruct.reconstruct``, which returns a ``ReconstructResult``) with its cached
    task results stored beside the checkpoints they point to, under
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
    if config.objective == "reconstruct":
        from flows.reconstruct import reconstruct as flow_fn
    else:
        flow_fn = pipeline
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: layerwise_home() / "prefect-results"}):
        return flow_fn(config=complete(config), **kwargs)


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


__all__ = ["pipeline", "run_pipeline", "PipelineResult", "ARMS"]
