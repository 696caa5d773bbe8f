"""What each pipeline stage writes to MLflow, and what a rerun reuses instead of writing again.

A stage's artifacts are a function of its content key (the data digest, the checkpoint
digests). A stage run whose key matches an earlier FINISHED run's records the earlier run
as ``layerwise.artifacts_from`` instead of uploading the same files again; its params and
metrics are still logged, so every run reads complete on its own. Likewise a classifier
whose checkpoint digest and data digest match a registered version reuses that version.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from runtime.errors import TrackingError
from tracking.registration import find_model_version, register_classifier
from tracking.tracker import Tracker
from tracking.vocabulary import (ARM_TAG, ARTIFACTS_FROM_TAG, ARTIFACTS_KEY_TAG, FORMAT_TAG,
                                 NOT_REGISTERED_TAG, TEST_ERROR_DIFF, TEST_ERROR_PRETRAINED,
                                 TEST_ERROR_RANDOM,
                                 VAL_ERROR_PRETRAINED)

# Bump when what the registered model takes or returns changes: versions of another
# format are never reused.
SERVED_FORMAT = "raw-pixels-probabilities-v2"  # v2: refuses input that is not pixels


def upload_once(tracker: Tracker, run: str, key: str, upload: Callable[[], None]
                ) -> Optional[str]:
    """Call ``upload()`` unless an earlier finished run holds the artifacts of ``key``.

    Returns:
        The earlier run's id (now tagged on ``run`` as ``layerwise.artifacts_from``), or
        None when ``upload()`` ran and ``run`` became the holder of ``key``.
    """
    earlier = tracker.find_run({ARTIFACTS_KEY_TAG: key})
    if earlier is not None:
        tracker.set_tags(run, {ARTIFACTS_FROM_TAG: earlier})
        return earlier
    upload()
    tracker.set_tags(run, {ARTIFACTS_KEY_TAG: key})  # only after every file is up
    return None


def log_data(tracker: Tracker, run: str, data: Any) -> Optional[str]:
    """The data stage's summary as params and a JSON artifact; its statistics as tensors.
    Returns the run whose artifacts were reused, if any."""
    from runtime.checkpoints import save_state

    summary = data.summary()
    tracker.log_params(run, {f"data.{k}": v for k, v in summary.items()
                             if not isinstance(v, (list, dict))})

    def upload() -> None:
        tracker.log_dict(run, summary, "data/summary.json")
        if data.norm_stats:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "normalization.safetensors"
                save_state(data.norm_stats, path)
                tracker.log_artifact(run, path, "data")

    return upload_once(tracker, run, f"load-data:{data.digest}", upload)


def log_layer(tracker: Tracker, run: str, layer: Any, history: bool = True) -> Optional[str]:
    """History, weights and figures of one pretrained layer. Returns the run whose
    artifacts were reused, if any.

    Args:
        history: Log the per-epoch history; False when its epochs were logged as they
            ended (``tracking.live``).
    """
    prefix = f"pretrain/layer_{layer.layer}"
    if history:
        tracker.log_history(run, prefix, layer.history)
    tracker.log_params(run, {"layer": layer.layer, "n_visible": layer.n_visible,
                             "n_hidden": layer.n_hidden, "checkpoint.sha256":
                             layer.checkpoint.sha256, "encoder.sha256": layer.encoder_sha256})
    tracker.log_metrics(run, {f"{prefix}/train_seconds": layer.train_seconds})

    def upload() -> None:
        tracker.log_artifact(run, layer.checkpoint.path, "weights")
        for path in layer.figures.values():
            tracker.log_artifact(run, path, "figures")

    return upload_once(tracker, run, f"pretrain:{layer.checkpoint.sha256}", upload)


def log_classifier_run(tracker: Tracker, run: str, result: Any, history: bool = True
                       ) -> Optional[str]:
    """History, stopping point and final weights of one fine-tuned arm, under the same
    keys in both arms' runs (``finetune/val_error``…) so that MLflow overlays the arms; the
    arm is the tag ``layerwise.arm``. ``finetune/train_seconds`` is the wall time of the
    population the arm trained in (the twins share theirs). Returns the run whose artifacts
    were reused, if any.

    Args:
        history: Log the per-epoch history; False when its epochs were logged as they
            ended (``tracking.live``).
    """
    prefix = "finetune"
    tracker.set_tags(run, {ARM_TAG: result.arm})
    if history:
        tracker.log_history(run, prefix, result.history)
    tracker.log_params(run, {"arm": result.arm, "checkpoint.sha256": result.checkpoint.sha256,
                             "initial_hidden_sha256": result.initial_hidden_sha256})
    tracker.log_metrics(run, {f"{prefix}/best_val_error": result.best_val_error,
                              f"{prefix}/best_epoch": result.best_epoch,
                              f"{prefix}/epochs_run": result.epochs_run,
                              f"{prefix}/train_seconds": result.train_seconds})
    return upload_once(tracker, run, f"finetune:{result.checkpoint.sha256}",
                       lambda: tracker.log_artifact(run, result.checkpoint.path, "weights"))


def log_evaluation(tracker: Tracker, run: str, parent: str, evaluation: Any,
                   results: dict[str, Any], config: Any, data: Any,
                   model_name: str
                   ) -> tuple[dict[str, float], Optional[str], bool, Optional[str], Optional[str]]:
    """Test metrics, figures and CSVs; the pretrained classifier, with the run's
    normalisation inside, logged as an MLflow model and registered, unless a version with
    the same checkpoint and data digests exists, or the model fails
    ``tasks.evaluate.release_problem`` (outputs not finite on the test set, or no better
    than chance): then nothing is registered and the reason is the run's tag
    ``layerwise.not_registered``.

    Returns:
        The metrics, the registered version (None: not registered), whether that version
        was reused, the run whose evaluation artifacts were reused (None if uploaded), and
        why the model was not registered (None: it was).
    """
    import torch

    from sources.read import raw_test_features
    from tasks.evaluate import ARMS, release_problem

    metrics = {
        TEST_ERROR_PRETRAINED: evaluation.arms["pretrained"].test_error,
        TEST_ERROR_RANDOM: evaluation.arms["random"].test_error,
        TEST_ERROR_DIFF: evaluation.error_diff,
        VAL_ERROR_PRETRAINED: results["pretrained"].best_val_error,  # what promote selects on
    }
    tracker.log_metrics(run, metrics)

    def upload() -> None:
        for path in evaluation.files.values():
            tracker.log_artifact(run, path, "evaluation")
        tracker.log_dict(run, evaluation.model_dump(mode="json"), "evaluation/summary.json")

    checkpoints = [results[a].checkpoint.sha256 for a in ARMS]
    reused_from = upload_once(tracker, run, f"evaluate:{data.digest}:{':'.join(checkpoints)}",
                              upload)
    identity = {"checkpoint.sha256": checkpoints[0], "data.digest": data.digest,
                FORMAT_TAG: SERVED_FORMAT}
    try:
        version = find_model_version(tracker, model_name, identity)
        if version is not None:
            return metrics, version, True, reused_from, None
        model = served_classifier(results["pretrained"].checkpoint, config, data,
                                  pixels=data.pixels)
        x_raw = as_inputs(raw_test_features(config.data))  # (M, D) as the user has them
        problem = release_problem(model, torch.from_numpy(x_raw), data.y_test, data.y_train,
                                  metrics[TEST_ERROR_PRETRAINED])
        if problem:
            tracker.set_tags(run, {NOT_REGISTERED_TAG: problem})
            return metrics, None, False, reused_from, problem
        version = register_classifier(
            tracker, run, model, as_inputs(data.input_example), model_name,
            {**identity, "layerwise.run_id": parent,
             "val_error": repr(metrics[VAL_ERROR_PRETRAINED]),
             "test_error": repr(metrics[TEST_ERROR_PRETRAINED])},
            description=model_description(config, data, metrics[TEST_ERROR_PRETRAINED]),
        )
    except Exception as exc:  # noqa: BLE001 - whatever broke, say where the work is
        kept = ", ".join(str(results[a].checkpoint.path) for a in ARMS)
        raise TrackingError(f"could not log or register the model in MLflow ({exc}); "
                            f"the fine-tuned weights are kept at {kept}") from exc
    return metrics, version, False, reused_from, None


def served_classifier(checkpoint: Any, config: Any, data: Any, pixels: bool = False) -> Any:
    """The fine-tuned classifier behind the run's normalisation: raw pixels in,
    probabilities out (``models.served.RawPixelClassifier``); with ``pixels`` (the source
    stores 8-bit pixels) it refuses requests that are clearly not values in 0-255."""
    from models.served import RawPixelClassifier
    from tasks.evaluate import load_classifier

    classifier = load_classifier(checkpoint, config, data.n_features, data.n_classes)
    return RawPixelClassifier(classifier, data.normalization, data.norm_stats,
                              pixel_range=(0.0, 255.0) if pixels else None).eval()


def as_inputs(raw: Any) -> Any:
    """Stored features as the served model takes them: contiguous float32 (N, D)."""
    import numpy as np

    return np.ascontiguousarray(raw, dtype=np.float32)


def model_description(config: Any, data: Any, test_error: float) -> str:
    """What the registered version takes and returns, in words an MLflow user reads."""
    from models.served import INPUT_DESCRIPTION, OUTPUT_DESCRIPTION

    return (
        f"Stacked denoising autoencoder {[data.n_features, *config.model.hidden_sizes, data.n_classes]}"
        f" ({config.model.activation}), greedily pretrained then fine-tuned. "
        f"Input: {INPUT_DESCRIPTION.format(n=data.n_features)}. The run's "
        f"'{data.normalization}' normalisation (statistics from its training split) is "
        f"applied inside the model. Output: {OUTPUT_DESCRIPTION.format(k=data.n_classes)}. "
        f"Test error {100 * test_error:.2f}% on {data.source} (data digest "
        f"{data.digest[:12]})."
    )
