"""The main job: load data, pretrain layer by layer, fine-tune the pretrained and the
random-init twins, evaluate both. Every stage is a Prefect task with its own nested MLflow
run under one parent run."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Optional

from prefect import flow
from pydantic import BaseModel

from tasks.config import PipelineConfig, check_train_size, flatten
from tasks.data import load_data_task
from tasks.errors import ConfigError, TrackingError
from tasks.evaluate import ARMS, evaluate_task, load_classifier, per_class_table
from tasks.finetune import finetune_twins_task
from tasks.pretrain import pretrain_layer_task
from tasks.runtime import eval_device, layerwise_home
from tasks.tracking import CACHED_TAG, KIND_TAG, STAGE_TAG, Tracker, environment_params


class StageReport(BaseModel):
    name: str
    seconds: float
    cached: bool
    mlflow_run_id: str


class PipelineResult(BaseModel):
    """What ``layerwise run`` prints and tests check."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    test_error_pretrained: float
    test_error_random: float
    test_error_diff: float
    model_name: str
    model_version: str
    data: dict[str, Any]
    stages: list[StageReport]


class StageRecorder:
    """Opens one nested MLflow run per stage and prints one line when the stage finishes."""

    def __init__(self, tracker: Tracker, parent_id: str, echo: Callable[[str], None]):
        self.tracker, self.parent_id, self.echo = tracker, parent_id, echo
        self.reports: list[StageReport] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[tuple[str, dict[str, Any]]]:
        started, info = time.perf_counter(), {"cached": False}
        with self.tracker.run(name, {STAGE_TAG: name}, self.parent_id) as run_id:
            yield run_id, info
            self.tracker.set_tags(run_id, {CACHED_TAG: str(info["cached"]).lower()})
        seconds = time.perf_counter() - started
        self.reports.append(StageReport(name=name, seconds=seconds, cached=info["cached"],
                                        mlflow_run_id=run_id))
        self.echo(f"  done  {name:<22} {seconds:8.1f} s{'  (from cache)' if info['cached'] else ''}")


def _run_task(task: Any, name: str, fresh: bool, info: dict[str, Any], *args: Any) -> Any:
    """Run a Prefect task under a readable task-run name; note whether it came from cache."""
    state = task.with_options(task_run_name=name, refresh_cache=fresh or None)(
        *args, return_state=True
    )
    info["cached"] = state.name == "Cached"
    return state.result()


@flow(name="layerwise-pipeline", validate_parameters=True)
def pipeline(
    config: PipelineConfig,
    preset: str = "custom",
    tracking_uri: Optional[str] = None,
    experiment: str = "layerwise",
    registered_model_name: str = "layerwise-classifier",
    fresh: bool = False,
) -> PipelineResult:
    """Greedy layer-wise pretraining vs random initialisation, recorded in MLflow."""
    from flows.expected_errors import install

    install()  # the project's own errors are logged without tracebacks (also when served)
    echo = print
    tracker = Tracker(tracking_uri, experiment)
    device = str(eval_device(config.runtime))
    with tracker.run("pipeline", {KIND_TAG: "pipeline"}) as parent:
        tracker.log_params(parent, {**flatten(config), "preset": preset,
                                    **environment_params(device)})
        stages = StageRecorder(tracker, parent, echo)

        with stages.stage("load-data") as (run, info):
            data = _run_task(load_data_task, "load-data", fresh, info, config.data)
            log_data(tracker, run, data)
        tracker.log_params(parent, {"data.digest": data.digest})
        try:
            check_train_size(config, len(data.x_train) if config.data.n_train is None
                             else config.data.n_train)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

        stack = []
        for k in range(config.model.n_layers):
            name = f"pretrain-layer-{k + 1}"
            with stages.stage(name) as (run, info):
                layer = _run_task(pretrain_layer_task, name, fresh, info, k, config, data, stack)
                log_layer(tracker, run, layer)
            stack.append(layer)

        # The twins fine-tune as one population of two (one pass over the data, the same
        # data order by construction) in the first arm's stage; each arm keeps its own run.
        results, twins = {}, None
        for arm in ARMS:
            name = f"finetune-{arm}"
            with stages.stage(name) as (run, info):
                if twins is None:
                    twins = _run_task(finetune_twins_task, "finetune-twins", fresh, info,
                                      config, data, stack)
                    cached = info["cached"]
                info["cached"] = cached
                results[arm] = twins.arms[arm]
                log_classifier_run(tracker, run, results[arm])

        with stages.stage("evaluate") as (run, info):
            evaluation = _run_task(evaluate_task, "evaluate", fresh, info, config, data, results)
            metrics, version = log_evaluation(tracker, run, parent, evaluation, results,
                                              config, data, registered_model_name)
        tracker.log_metrics(parent, metrics)
        tracker.set_tags(parent, {"layerwise.model_version": version})
        result = PipelineResult(
            run_id=parent, experiment_id=tracker.experiment_id, tracking_uri=tracker.uri,
            test_error_pretrained=metrics["test/error_pretrained"],
            test_error_random=metrics["test/error_random"],
            test_error_diff=metrics["test/error_diff"],
            model_name=registered_model_name, model_version=version,
            data=data.summary(), stages=stages.reports,
        )
        summary_markdown(result, per_class_table(evaluation))
    return result


def run_pipeline(config: PipelineConfig, **kwargs: Any) -> PipelineResult:
    """Run the flow with its cached task results stored beside the checkpoints they point
    to, under ``$LAYERWISE_HOME/prefect-results`` (the flow reads the setting at start)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from tasks.tracking import check_reachable, default_tracking_uri, preflight_mlflow

    preflight_mlflow(kwargs.get("tracking_uri") or default_tracking_uri())
    api = PREFECT_API_URL.value()
    if api:  # a server: make sure it answers before any work (ephemeral mode needs none)
        check_reachable(api.rstrip("/") + "/health", "the Prefect API",
                        "Start the server, or unset PREFECT_API_URL to run ephemeral.")
    from flows.ephemeral_api import ready

    # Every run needs these, cached or not (the stages, evaluation, the logged model);
    # imported here, their ~5 s overlap the boot of the ephemeral Prefect server that the
    # CLI started in the background, which ready() then waits for.
    import lightning  # noqa: F401
    import mlflow.pytorch  # noqa: F401

    ready()
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: layerwise_home() / "prefect-results"}):
        return pipeline(config=config, **kwargs)


def log_evaluation(tracker: Tracker, run: str, parent: str, evaluation: Any,
                   results: dict[str, Any], config: PipelineConfig, data: Any,
                   model_name: str) -> tuple[dict[str, float], str]:
    """Test metrics, figures and CSVs; the pretrained classifier logged as an MLflow model
    and registered. Returns the metrics and the registered version."""
    metrics = {
        "test/error_pretrained": evaluation.arms["pretrained"].test_error,
        "test/error_random": evaluation.arms["random"].test_error,
        "test/error_diff": evaluation.error_diff,
    }
    tracker.log_metrics(run, metrics)
    for path in evaluation.files.values():
        tracker.log_artifact(run, path, "evaluation")
    tracker.log_dict(run, evaluation.model_dump(mode="json"), "evaluation/summary.json")
    model = load_classifier(results["pretrained"].checkpoint, config, data.n_features,
                            data.n_classes)
    try:
        version = tracker.log_classifier(
            run, model, data.x_test[:5].numpy(), model_name,
            {"layerwise.run_id": parent, "data.digest": data.digest,
             "test_error": repr(metrics["test/error_pretrained"])},
        )
    except Exception as exc:  # noqa: BLE001 - whatever broke, say where the work is
        kept = ", ".join(str(results[a].checkpoint.path) for a in ARMS)
        raise TrackingError(f"could not log or register the model in MLflow ({exc}); "
                            f"the fine-tuned weights are kept at {kept}") from exc
    return metrics, version


def log_data(tracker: Tracker, run: str, data: Any) -> None:
    """The data stage's summary as params and a JSON artifact; its statistics as tensors."""
    from tasks.checkpoints import save_state

    summary = data.summary()
    tracker.log_params(run, {f"data.{k}": v for k, v in summary.items()
                             if not isinstance(v, (list, dict))})
    tracker.log_dict(run, summary, "data/summary.json")
    if data.norm_stats:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "normalization.safetensors"
            save_state(data.norm_stats, path)
            tracker.log_artifact(run, path, "data")


def log_layer(tracker: Tracker, run: str, layer: Any) -> None:
    """History, weights and figures of one pretrained layer."""
    prefix = f"pretrain/layer_{layer.layer}"
    tracker.log_history(run, prefix, layer.history)
    tracker.log_params(run, {"layer": layer.layer, "n_visible": layer.n_visible,
                             "n_hidden": layer.n_hidden, "checkpoint.sha256":
                             layer.checkpoint.sha256, "encoder.sha256": layer.encoder_sha256})
    tracker.log_metrics(run, {f"{prefix}/train_seconds": layer.train_seconds})
    tracker.log_artifact(run, layer.checkpoint.path, "weights")
    for path in layer.figures.values():
        tracker.log_artifact(run, path, "figures")


def log_classifier_run(tracker: Tracker, run: str, result: Any) -> None:
    """History, stopping point and final weights of one fine-tuned arm."""
    prefix = f"finetune/{result.arm}"
    tracker.log_history(run, prefix, result.history)
    tracker.log_params(run, {"arm": result.arm, "checkpoint.sha256": result.checkpoint.sha256,
                             "initial_hidden_sha256": result.initial_hidden_sha256})
    tracker.log_metrics(run, {f"{prefix}/best_val_error": result.best_val_error,
                              f"{prefix}/best_epoch": result.best_epoch,
                              f"{prefix}/epochs_run": result.epochs_run,
                              f"{prefix}/train_seconds": result.train_seconds})
    tracker.log_artifact(run, result.checkpoint.path, "weights")


def summary_markdown(result: PipelineResult, per_class: Any) -> str:
    """A Prefect markdown artifact summarising the run; returns the markdown."""
    from prefect.artifacts import create_markdown_artifact

    lines = [
        "# layerwise pipeline", "",
        "| init | test error |", "| --- | --- |",
        f"| pretrained | {100 * result.test_error_pretrained:.2f} % |",
        f"| random | {100 * result.test_error_random:.2f} % |",
        f"| difference (pretrained − random) | {100 * result.test_error_diff:+.2f} pp |", "",
        f"MLflow run `{result.run_id}` at `{result.tracking_uri}`; model "
        f"`{result.model_name}` v{result.model_version}; data digest `{result.data['digest'][:16]}`.",
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
