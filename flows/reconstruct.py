"""The second job, the deep autoencoder (Hinton & Salakhutdinov 2006): load data, pretrain
layer by layer (the same cached stages as the classifier pipeline), unroll the stack into
encoder and mirrored decoder, fine-tune it on reconstruction from the pretrained stack and
from random initialisation, evaluate both against PCA. Same MLflow contract as
``flows.pipeline``: one parent run, one nested run per stage, one per fine-tuning arm."""

from __future__ import annotations

from typing import Any, Optional

from prefect import flow
from pydantic import BaseModel

from config.parameters import resolve_flow_config
from config.stages import PipelineConfig, flatten
from flows.stages import (StageRecorder, StageReport, data_and_pretraining, flow_run_name,
                          run_task)
from runtime.console import announce
from runtime.devices import eval_device, precision_used
from runtime.errors import ConfigError
from tasks.finetune import ARMS
from tasks.reconstruct import finetune_autoencoders_task
from tasks.reconstruct_eval import METHODS, evaluate_reconstruction_task
from tracking.autoencoder_records import log_reconstruction
from tracking.conventions import run_description, run_name
from tracking.records import log_classifier_run
from tracking.stale import end_dead_runs
from tracking.tracker import Tracker, environment_params
from tracking.vocabulary import (KIND_TAG, KNN_ACCURACY, NOTE_TAG, RECON_ERROR,
                                 RECON_ERROR_DIFF, RECON_LOSS)


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


@flow(name="layerwise-reconstruct", validate_parameters=True, flow_run_name=flow_run_name)
def reconstruct(
    config: Optional[PipelineConfig] = None,
    preset: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    tracking_uri: Optional[str] = None,
    experiment: str = "layerwise",
    registered_model_name: str = "layerwise-autoencoder",
    encoder_model_name: str = "layerwise-encoder",
    fresh: bool = False,
) -> ReconstructResult:
    """Greedy layer-wise pretraining vs random initialisation of a deep autoencoder, against
    PCA, recorded in MLflow.

    Args:
        config: A complete config with ``objective='reconstruct'``; None to build it from
            ``preset`` and ``overrides``.
        preset: Preset name (default ``ae-small``).
        overrides: ``section.field=value`` items, as ``layerwise run --set`` takes them.
        tracking_uri: MLflow tracking URI.
        experiment: MLflow experiment name.
        registered_model_name: Registered model the pretrained autoencoder joins.
        encoder_model_name: Registered model its encoder (raw pixels -> code) joins.
        fresh: Recompute every stage instead of reusing cached results.
    """
    from prefect.runtime import flow_run

    from runtime.expected_errors import install

    install()
    echo = announce  # printed, and in the flow run's logs in the Prefect UI
    config, preset, overrides = resolve_flow_config(config, preset or "ae-small",
                                                    overrides or [])
    if config.objective != "reconstruct":
        raise ConfigError("the layerwise-reconstruct flow needs objective='reconstruct' "
                          "(set it, or run the classifier flow layerwise-pipeline)")
    tracker = Tracker(tracking_uri, experiment, source_name="flows/reconstruct.py")
    if killed := end_dead_runs(tracker.client, experiment):
        echo(f"  marked {len(killed)} MLflow run(s) of an earlier, killed attempt KILLED")
    device = str(eval_device(config.runtime))
    name = flow_run.name or run_name(preset, config.runtime.seed)
    with tracker.run(name, {KIND_TAG: "pipeline", NOTE_TAG: run_description(
            "pipeline", preset, config)}) as parent:
        tracker.log_params(parent, {**flatten(config), "preset": preset, "overrides": overrides,
                                    **environment_params(device, precision_used(config.runtime))})
        stages = StageRecorder(tracker, parent, echo, config.objective)
        data, stack = data_and_pretraining(config, tracker, parent, stages, fresh)

        # Both arms fine-tune as one population of two (one pass over the data, the same
        # order by construction); each arm keeps its own run, open while they train.
        results = {}
        with stages.together([f"finetune-{arm}" for arm in ARMS], "finetune",
                             "finetune-autoencoders") as runs:
            info = runs[0][1]
            twins = run_task(finetune_autoencoders_task, "finetune-autoencoders", fresh, info,
                             config, data, stack)
            for arm, (run, arm_info) in zip(ARMS, runs):
                arm_info["cached"] = info["cached"]
                results[arm] = twins.arms[arm]
                arm_info["artifacts_from"] = log_classifier_run(
                    tracker, run, results[arm], history=run not in info["live"])

        with stages.stage("evaluate") as (run, info):
            evaluation = run_task(evaluate_reconstruction_task, "evaluate", fresh, info,
                                   config, data, results)
            names = {"autoencoder": registered_model_name, "encoder": encoder_model_name}
            metrics, versions, reused, info["artifacts_from"] = log_reconstruction(
                tracker, run, parent, evaluation, results, config, data, names)
        tracker.log_metrics(parent, metrics)
        tracker.set_tags(parent, {f"layerwise.model_version.{k}": v for k, v in versions.items()})
        result = ReconstructResult(
            run_id=parent, experiment_id=tracker.experiment_id, tracking_uri=tracker.uri,
            recon_error={m: metrics[RECON_ERROR.format(m)] for m in METHODS},
            recon_loss={m: metrics[RECON_LOSS.format(m)] for m in METHODS},
            knn_accuracy={m: metrics[KNN_ACCURACY.format(m)] for m in METHODS},
            recon_error_diff=metrics[RECON_ERROR_DIFF],
            val_error_pretrained=results["pretrained"].best_val_error,
            model_versions={names[k]: v for k, v in versions.items()}, models_reused=reused,
            data=data.summary(), stages=stages.reports)
        summary_markdown(result, config.autoencoder.knn_k)
    return result


def summary_markdown(result: ReconstructResult, knn_k: int) -> str:
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


__all__ = ["reconstruct", "ReconstructResult"]
