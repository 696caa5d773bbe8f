"""The pipeline's answer, from the evaluation of both arms: each method's test score and
the pretrained − random difference, as the parent run's headline metrics and one line."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tracking.vocabulary import (KNN_ACCURACY, RECON_ERROR, RECON_ERROR_DIFF, RECON_LOSS,
                                 TEST_ERROR_DIFF, TEST_ERROR_PRETRAINED, TEST_ERROR_RANDOM,
                                 VAL_ERROR_PRETRAINED)


class Comparison(BaseModel):
    """The headline metrics (``tracking.vocabulary`` names) and their one-line summary."""

    metrics: dict[str, float]
    line: str


def compare(evaluation: Any) -> Comparison:
    """The comparison of ``tasks.evaluate.Evaluation`` (test error of both arms) or
    ``tasks.reconstruct_eval.ReconstructEvaluation`` (squared error per test image, loss and
    k-NN accuracy of the code, for both arms and PCA). Both carry the pretrained arm's best
    validation score, what ``layerwise promote`` selects on."""
    if hasattr(evaluation, "methods"):
        metrics = {RECON_ERROR_DIFF: evaluation.error_diff}
        for method, ev in evaluation.methods.items():
            metrics[RECON_ERROR.format(method)] = ev.sq_error_per_image
            metrics[RECON_LOSS.format(method)] = ev.loss
            metrics[KNN_ACCURACY.format(method)] = ev.knn_accuracy
        line = "squared error per test image: " + ", ".join(
            f"{m} {ev.sq_error_per_image:.3f}" for m, ev in evaluation.methods.items())
    else:
        arms = evaluation.arms
        metrics = {TEST_ERROR_PRETRAINED: arms["pretrained"].test_error,
                   TEST_ERROR_RANDOM: arms["random"].test_error,
                   TEST_ERROR_DIFF: evaluation.error_diff}
        line = (f"test error: pretrained {100 * arms['pretrained'].test_error:.2f} %, random "
                f"{100 * arms['random'].test_error:.2f} %")
    return Comparison(metrics={**metrics,
                               VAL_ERROR_PRETRAINED: evaluation.val_error_pretrained},
                      line=line)
