"""Supervised fine-tuning of the deep classifier, from pretrained encoders or from random
initialisation. The twins share architecture, data order, budget and stopping rule; only the
initial hidden weights differ."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import BaseModel

from tasks.checkpoints import Checkpoint, save_state, tensor_sha256
from tasks.config import PipelineConfig
from tasks.errors import DivergenceError
from tasks.pretrain import LayerResult, layer_states
from tasks.runtime import derive_seed, fit, make_trainer, stage_dir, stage_key

Arm = Literal["pretrained", "random"]


class ClassifierResult(BaseModel):
    """A fine-tuned classifier: its checkpoint, where it started, and how training went."""

    arm: Arm
    checkpoint: Checkpoint
    initial_hidden_sha256: list[str]
    history: list[dict[str, float]]
    best_val_error: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    train_seconds: float


def build_classifier(arm: Arm, config: PipelineConfig, n_features: int, n_classes: int,
                     encoder_states: Optional[Sequence[dict[str, torch.Tensor]]] = None):
    """The classifier of one arm: pretrained encoders, or the same shape at random."""
    from models.classifier import DeepClassifier

    m = config.model
    if arm == "pretrained":
        if not encoder_states or len(encoder_states) != m.n_layers:
            raise ValueError(f"the pretrained arm needs {m.n_layers} encoder states")
        return DeepClassifier.from_encoder_states(encoder_states, n_classes, m.activation,
                                                  m.dropout)
    generator = torch.Generator().manual_seed(derive_seed(config.runtime.seed, "random-init"))
    return DeepClassifier.random_init(n_features, m.hidden_sizes, n_classes, m.activation,
                                      m.init, m.dropout, generator)


def hidden_digests(classifier: Any) -> list[str]:
    """Digest of each hidden layer's (W, b), comparable with ``LayerResult.encoder_sha256``."""
    return [tensor_sha256(layer.state_dict()) for layer in classifier.hidden]


def finetune(arm: Arm, config: PipelineConfig, data: Any,
             encoder_states: Optional[Sequence[dict[str, torch.Tensor]]], out_dir: Path
             ) -> ClassifierResult:
    """Fine-tune one arm; restore its best validation weights; save them as safetensors."""
    from models.batches import TensorDataModule
    from models.callbacks import EpochHistory, TutorialEarlyStopping
    from models.finetune_module import LitClassifier

    f, rt = config.finetune, config.runtime
    classifier = build_classifier(arm, config, data.n_features, data.n_classes, encoder_states)
    initial = hidden_digests(classifier)
    system = LitClassifier(classifier, arm, f.optimizer.model_dump())
    history = EpochHistory(system.prefix)
    stopping = TutorialEarlyStopping(
        monitor=f"{system.prefix}/val_error",
        rule=f.early_stopping,
        patience_batches=f.patience_batches,
        patience_increase=f.patience_increase,
        improvement_threshold=f.improvement_threshold,
        patience_epochs=f.patience_epochs,
    )
    # Both arms draw their data order from the same seed: only the initial weights differ.
    datamodule = TensorDataModule(
        (data.x_train, data.y_train), (data.x_valid, data.y_valid), f.batch_size,
        derive_seed(rt.seed, "finetune-order"), rt.eval_batch_size,
    )
    # Dropout draws from the global RNG: seed it identically for both arms.
    torch.manual_seed(derive_seed(rt.seed, "finetune-dropout"))
    started = time.perf_counter()
    try:
        fit(make_trainer(rt, f.max_epochs, [history, stopping]), system, datamodule)
    except FloatingPointError as exc:
        raise DivergenceError(str(exc)) from exc
    seconds = time.perf_counter() - started
    classifier = classifier.cpu().eval()
    checkpoint = save_state(classifier.state_dict(), out_dir / f"classifier_{arm}.safetensors",
                            {"arm": arm})
    return ClassifierResult(
        arm=arm,
        checkpoint=checkpoint,
        initial_hidden_sha256=initial,
        history=history.rows,
        best_val_error=stopping.best,
        best_epoch=stopping.best_epoch,
        epochs_run=len(history.rows),
        stopped_early=stopping.stopped_early,
        train_seconds=seconds,
    )


def finetune_cache_key(arm: Arm, config: PipelineConfig, data_digest: str,
                       encoders: Optional[Sequence[LayerResult]]) -> str:
    """The random arm does not depend on pretraining, so changing it never invalidates it."""
    return stage_key(
        f"finetune-{arm}",
        kind="finetune",
        data=data_digest,
        model=config.model.model_dump(mode="json"),
        finetune=config.finetune.model_dump(mode="json"),
        runtime=config.runtime.model_dump(mode="json", exclude={"eval_batch_size"}),
        encoders=[r.checkpoint.sha256 for r in encoders or []],
    )


def _cache_key(ctx: Any, params: dict[str, Any]) -> str:
    return finetune_cache_key(params["arm"], params["config"], params["data"].digest,
                              params.get("encoders"))


@task(
    name="finetune",
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_cache_key),
    persist_result=True,
    result_serializer="json",
)
def finetune_task(arm: Arm, config: PipelineConfig, data: Any,
                  encoders: Optional[list[LayerResult]] = None) -> ClassifierResult:
    """Prefect task: fine-tune one arm; cached on configs and digests, never on tensors."""
    key = finetune_cache_key(arm, config, data.digest, encoders)
    states = layer_states(encoders) if arm == "pretrained" else None
    return finetune(arm, config, data, states, stage_dir(f"finetune-{arm}", key))
