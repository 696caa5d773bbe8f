"""Final report on the test split, used only here: test error of both arms, per-class error,
confusion matrices, learning curves and the pretrained-minus-random difference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from runtime.checkpoints import load_state
from config.stages import PipelineConfig
from tasks.finetune import ARMS, ClassifierResult
from runtime.devices import eval_device
from runtime.keys import stage_dir, stage_key


class ArmEvaluation(BaseModel):
    """Test-set figures of one arm."""

    arm: str
    test_error: float
    n_errors: int
    per_class_error: list[float]
    confusion: list[list[int]]


class Evaluation(BaseModel):
    """Both arms, their difference (pretrained − random, a fraction) and the figure files."""

    arms: dict[str, ArmEvaluation]
    error_diff: float
    n_test: int
    files: dict[str, Path]
    val_error_pretrained: float  # the pretrained arm's best validation error
    artifacts_key: str  # what the files are a function of: the data and both checkpoints


def load_classifier(checkpoint: Any, config: PipelineConfig, n_features: int, n_classes: int):
    """Rebuild a fine-tuned classifier from its verified safetensors checkpoint."""
    from models.classifier import DeepClassifier

    m = config.model
    model = DeepClassifier.random_init(n_features, m.hidden_sizes, n_classes, m.activation,
                                       m.init, m.dropout)
    model.load_state_dict(load_state(checkpoint))
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Predicted labels, (N, D) -> (N,), in large batches on ``device``."""
    model = model.to(device).eval()
    preds = [model(x[i : i + batch_size].to(device)).argmax(dim=1).cpu()
             for i in range(0, len(x), batch_size)]
    return torch.cat(preds)


def evaluate(config: PipelineConfig, data: Any, results: dict[str, ClassifierResult],
             out_dir: Path) -> Evaluation:
    """Score both arms on the test split and draw the comparison figures into ``out_dir``."""
    from reports import figures

    device = eval_device(config.runtime)
    y_true = data.y_test.numpy()
    arms, files = {}, {}
    for arm in ARMS:
        model = load_classifier(results[arm].checkpoint, config, data.n_features, data.n_classes)
        y_pred = predict(model, data.x_test, config.runtime.eval_batch_size, device).numpy()
        cm = figures.confusion_matrix(y_true, y_pred, data.n_classes)
        n_errors = int((y_pred != y_true).sum())
        arms[arm] = ArmEvaluation(
            arm=arm,
            test_error=n_errors / len(y_true),
            n_errors=n_errors,
            per_class_error=[float(e) for e in figures.per_class_error(cm)],
            confusion=cm.tolist(),
        )
        png, csv = figures.save_confusion_matrix(
            cm, out_dir / f"confusion_{arm}.png", out_dir / f"confusion_{arm}.csv",
            title=f"{arm} init: test error {100 * arms[arm].test_error:.2f}%",
        )
        files[f"confusion_{arm}_png"], files[f"confusion_{arm}_csv"] = png, csv
    files["learning_curves"] = figures.save_learning_curves(
        {arm: results[arm].history for arm in ARMS}, out_dir / "learning_curves.png"
    )
    return Evaluation(
        arms=arms,
        error_diff=arms["pretrained"].test_error - arms["random"].test_error,
        n_test=len(y_true),
        files=files,
        val_error_pretrained=results["pretrained"].best_val_error,
        artifacts_key=f"evaluate:{data.digest}:"
                      + ":".join(results[a].checkpoint.sha256 for a in ARMS),
    )


def per_class_table(evaluation: Evaluation) -> "Any":
    """Per-class test error of both arms as a DataFrame (one row per class)."""
    import pandas as pd

    return pd.DataFrame(
        {arm: evaluation.arms[arm].per_class_error for arm in ARMS}
    ).rename_axis("class")


@task(name="evaluate", task_run_name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(config: PipelineConfig, data: Any,
                  results: dict[str, ClassifierResult]) -> Evaluation:
    """Prefect task: evaluate both arms (cheap, so never cached)."""
    key = stage_key("evaluate", kind="evaluate", data=data.digest,
                    checkpoints=[results[a].checkpoint.sha256 for a in ARMS])
    return evaluate(config, data, results, stage_dir("evaluate", key))
