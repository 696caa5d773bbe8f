"""What the reconstruct objective's evaluate stage writes to MLflow: the test metrics of
both arms and PCA, the figures, and two registered models (the autoencoder and its encoder)
with the classifier's raw-input contract. The stages before it write what the classifier
pipeline's do (``tracking.records``)."""

from __future__ import annotations

from typing import Any, Optional

from runtime.errors import TrackingError
from tracking.records import as_inputs, upload_once
from tracking.registration import find_model_version, register_classifier
from tracking.tracker import Tracker
from tracking.vocabulary import (FORMAT_TAG, KNN_ACCURACY, RECON_ERROR, RECON_ERROR_DIFF,
                                 RECON_LOSS, VAL_ERROR_PRETRAINED)

#: Served formats, by what a version returns (bump when that changes).
SERVED_FORMATS = {"autoencoder": "raw-pixels-reconstruction-v1", "encoder": "raw-pixels-code-v1"}


def reconstruction_metrics(evaluation: Any, results: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics: per method the squared error per test image, the loss and
    the k-NN accuracy of its code; the pretrained − random difference; and the pretrained
    arm's best validation squared error (what ``promote`` selects on)."""
    metrics = {RECON_ERROR_DIFF: evaluation.error_diff,
               VAL_ERROR_PRETRAINED: results["pretrained"].best_val_error}
    for method, ev in evaluation.methods.items():
        metrics[RECON_ERROR.format(method)] = ev.sq_error_per_image
        metrics[RECON_LOSS.format(method)] = ev.loss
        metrics[KNN_ACCURACY.format(method)] = ev.knn_accuracy
    return metrics


def log_reconstruction(tracker: Tracker, run: str, parent: str, evaluation: Any,
                       results: dict[str, Any], config: Any, data: Any,
                       names: dict[str, str]) -> tuple[dict[str, float], dict[str, str], bool,
                                                        Optional[str]]:
    """Test metrics and figures; the pretrained autoencoder and its encoder, behind the
    run's normalisation, logged and registered unless versions with the same checkpoint
    and data digests exist.

    Args:
        names: ``{"autoencoder": registered name, "encoder": registered name}``.

    Returns:
        The metrics, the version of each registered model, whether both were reused, and
        the run whose evaluation artifacts were reused (None if uploaded).
    """
    metrics = reconstruction_metrics(evaluation, results)
    tracker.log_metrics(run, metrics)

    def upload() -> None:
        for path in evaluation.files.values():
            tracker.log_artifact(run, path, "evaluation")
        tracker.log_dict(run, evaluation.model_dump(mode="json"), "evaluation/summary.json")

    sha = {arm: results[arm].checkpoint.sha256 for arm in results}
    reused_from = upload_once(
        tracker, run, f"evaluate-reconstruction:{data.digest}:{sha['pretrained']}:"
        f"{sha['random']}:{evaluation.knn_k}", upload)
    versions, reused = {}, True
    try:
        for kind, name in names.items():
            identity = {"checkpoint.sha256": sha["pretrained"], "data.digest": data.digest,
                        FORMAT_TAG: SERVED_FORMATS[kind]}
            version = find_model_version(tracker, name, identity)
            if version is None:
                reused = False
                version = register_classifier(
                    tracker, run, served_autoencoder(results["pretrained"].checkpoint, config,
                                                     data, code=kind == "encoder"),
                    as_inputs(data.input_example), name,
                    {**identity, "layerwise.run_id": parent,
                     "val_error": repr(metrics[VAL_ERROR_PRETRAINED]),
                     "test_error": repr(metrics[RECON_ERROR.format("pretrained")])},
                    description=description(kind, config, data, metrics), artifact=kind)
            versions[kind] = version
    except Exception as exc:  # noqa: BLE001 - whatever broke, say where the work is
        kept = ", ".join(str(r.checkpoint.path) for r in results.values())
        raise TrackingError(f"could not log or register the autoencoder in MLflow ({exc}); "
                            f"the fine-tuned weights are kept at {kept}") from exc
    return metrics, versions, reused, reused_from


def served_autoencoder(checkpoint: Any, config: Any, data: Any, code: bool = False) -> Any:
    """The fine-tuned autoencoder behind the run's normalisation: raw pixels in, the
    reconstruction in their scale (or, with ``code``, the code) out."""
    from models.autoencoder import single
    from models.served import RawPixelAutoencoder
    from runtime.checkpoints import load_state
    from tasks.reconstruct import activations

    net = single(load_state(checkpoint), activations(config), config.autoencoder.loss)
    return RawPixelAutoencoder(net, data.norm_stats, code=code).eval()


def description(kind: str, config: Any, data: Any, metrics: dict[str, float]) -> str:
    """What the registered version takes and returns, in words an MLflow user reads."""
    from models.served import AE_OUTPUT_DESCRIPTION, CODE_DESCRIPTION, INPUT_DESCRIPTION

    sizes = [data.n_features, *config.model.hidden_sizes]
    output = (CODE_DESCRIPTION.format(c=sizes[-1]) if kind == "encoder"
              else AE_OUTPUT_DESCRIPTION.format(n=data.n_features))
    return (
        f"{'Encoder of the deep' if kind == 'encoder' else 'Deep'} autoencoder {sizes} "
        f"(code {config.autoencoder.code_activation}), greedily pretrained then fine-tuned "
        f"on reconstruction. Input: {INPUT_DESCRIPTION.format(n=data.n_features)}. The "
        f"run's '{data.normalization}' scaling is applied inside the model. Output: "
        f"{output}. Squared error per test image {metrics[RECON_ERROR.format('pretrained')]:.3f}"
        f" (PCA {metrics[RECON_ERROR.format('pca')]:.3f}) on {data.source} (data digest "
        f"{data.digest[:12]})."
    )
