"""What each pipeline stage writes to MLflow, and what a rerun reuses instead of writing again.

A stage's artifacts are a function of its content key (the data digest, the checkpoint
digests). A stage run whose key matches an earlier FINISHED run's records the earlier run
as ``layerwise.artifacts_from`` instead of uploading the same files again; its params and
metrics are still logged, so every run reads complete on its own. Likewise a classifier
whose checkpoint digest and data digest match a registered version reuses that version
(``tracking.registration``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from tracking.tracker import Tracker
from tracking.vocabulary import ARM_TAG, ARTIFACTS_FROM_TAG, ARTIFACTS_KEY_TAG


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


def log_arm(tracker: Tracker, run: str, result: Any, history: bool = True
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


def log_evaluation(tracker: Tracker, run: str, evaluation: Any) -> Optional[str]:
    """The evaluation's files (figures, CSVs) and its summary, uploaded once per content key
    (``tasks.evaluate.Evaluation`` or ``tasks.reconstruct_eval.ReconstructEvaluation``).
    Its metrics are logged by the comparison that follows (``tasks.compare``). Returns the
    run whose artifacts were reused, if any."""
    def upload() -> None:
        for path in evaluation.files.values():
            tracker.log_artifact(run, path, "evaluation")
        tracker.log_dict(run, evaluation.model_dump(mode="json"), "evaluation/summary.json")

    return upload_once(tracker, run, evaluation.artifacts_key, upload)


#: How each stage's result is recorded, by the result's type (the tasks' return types,
#: named here so that tracking imports nothing of tasks), and whether it has a per-epoch
#: history.
RECORDS: dict[str, tuple[Callable[..., Optional[str]], bool]] = {
    "DataBundle": (log_data, False),
    "LayerResult": (log_layer, True),
    "ClassifierResult": (log_arm, True),
    "AutoencoderResult": (log_arm, True),
    "Evaluation": (log_evaluation, False),
    "ReconstructEvaluation": (log_evaluation, False),
}


def record(tracker: Tracker, run: str, result: Any, history: bool = True) -> Optional[str]:
    """Record one stage's result in its run, by its type (``RECORDS``). Returns the run
    whose identical artifacts were reused, if any.

    Args:
        history: Log the per-epoch history; False when its epochs were logged as they
            ended (``tracking.live``).
    """
    kind = type(result).__name__
    if kind not in RECORDS:
        raise TypeError(f"no record for a stage result of type {kind}; add it to RECORDS")
    log, has_history = RECORDS[kind]
    return log(tracker, run, result, history=history) if has_history else log(tracker, run,
                                                                                result)
