"""Supervised fine-tuning of the deep classifier, from pretrained encoders or from random
initialisation. The twins share architecture, data order, budget and stopping rule; only the
initial hidden weights differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import torch
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import BaseModel

from runtime.checkpoints import Checkpoint, save_state, tensor_sha256
from config.stages import PipelineConfig
from runtime.errors import DivergenceError
from tasks.pretrain import LayerResult, layer_states
from runtime.progress import current_observer
from runtime.devices import eval_device
from runtime.keys import Seed, derive_seed, runtime_key, stage_dir, stage_key
from training.trainer import make_trainer

Arm = Literal["pretrained", "random"]
#: The twins, in the order the pipeline fine-tunes, evaluates and reports them.
ARMS: tuple[Arm, ...] = ("pretrained", "random")


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
    train_seconds: float  # the wall time of the population it trained in
    trained_together: int = 1  # members of that population, this one included


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
    generator = torch.Generator().manual_seed(derive_seed(config.runtime.seed, Seed.RANDOM_INIT))
    return DeepClassifier.random_init(n_features, m.hidden_sizes, n_classes, m.activation,
                                      m.init, m.dropout, generator)


def hidden_digests(classifier: Any) -> list[str]:
    """Digest of each hidden layer's (W, b), comparable with ``LayerResult.encoder_sha256``."""
    return [tensor_sha256(layer.state_dict()) for layer in classifier.hidden]


def finetune_members(arms: Sequence[Arm], configs: Sequence[PipelineConfig], data: Any,
                     encoder_states: Sequence[Optional[Sequence[dict[str, torch.Tensor]]]],
                     paths: Sequence[Path]) -> list[ClassifierResult]:
    """Fine-tune P >= 1 classifiers as one population: the twins of one seed, the same arm
    of several seeds, or a single run (P = 1). Each member stops on its own rule, ends with
    its own best validation weights and is saved to ``paths[p]``.

    Member p's data order and dropout masks come from its seed (``Seed.FINETUNE_ORDER``,
    ``Seed.FINETUNE_DROPOUT``): twins share them by construction, so only their initial
    hidden weights differ.

    Args:
        arms: Member p's arm.
        configs: Member p's config; they differ in ``runtime.seed`` only.
        data: The shared ``DataBundle``.
        encoder_states: Member p's pretrained encoder states (pretrained arm) or None.
        paths: Where member p's safetensors go.
    Raises:
        DivergenceError: a member's loss became NaN/inf (the message names it).
    """
    from training.classifier_training import train_classifier_population
    from training.stopping_rules import rule_of
    from tasks.pretrain import seedless

    if not len(arms) == len(configs) == len(encoder_states) == len(paths) > 0:
        raise ValueError("give one arm, config, encoder stack and path per member")
    if len(set(zip(arms, (c.runtime.seed for c in configs)))) != len(arms) or any(
            seedless(c) != seedless(configs[0]) for c in configs):
        raise ValueError("members must be distinct (arm, seed) pairs of one config")
    f, rt = configs[0].finetune, configs[0].runtime
    device = eval_device(rt)
    classifiers = [build_classifier(a, c, data.n_features, data.n_classes, s)
                   for a, c, s in zip(arms, configs, encoder_states)]
    initial = [hidden_digests(c) for c in classifiers]
    seeds = [c.runtime.seed for c in configs]
    try:
        result = train_classifier_population(
            classifiers, data.x_train.to(device), data.y_train.to(device),
            data.x_valid.to(device), data.y_valid.to(device),
            order_seeds=[derive_seed(s, Seed.FINETUNE_ORDER) for s in seeds],
            batch_size=f.batch_size,
            optimizer={**f.optimizer.model_dump(), "fused": rt.fused_update},
            stopping=rule_of(f),
            dropout_seeds=([derive_seed(s, Seed.FINETUNE_DROPOUT) for s in seeds]
                           if configs[0].model.dropout > 0 else None),
            eval_batch_size=rt.eval_batch_size, stage="fine-tuning",
            names=[f"finetune/{a} (seed {s})" for a, s in zip(arms, seeds)],
            trainer=make_trainer(rt, f.max_epochs),
            observer=current_observer(), resume_dir=Path(paths[0]).parent / "resume",
            checkpoint_seconds=rt.checkpoint_seconds)
    except FloatingPointError as exc:
        raise DivergenceError(f"{exc}. Lower finetune.optimizer.lr or add weight "
                              "decay.") from exc
    return [ClassifierResult(
        arm=arm, checkpoint=save_state(state, path, {"arm": arm, "seed": str(seed)}),
        initial_hidden_sha256=initial[i], history=result.histories[i],
        best_val_error=result.best_val_error[i], best_epoch=result.best_epoch[i],
        epochs_run=len(result.histories[i]), stopped_early=result.stopped_early[i],
        train_seconds=result.seconds, trained_together=len(arms))
        for i, (arm, seed, state, path) in enumerate(zip(arms, seeds, result.states, paths))]


def finetune(arm: Arm, config: PipelineConfig, data: Any,
             encoder_states: Optional[Sequence[dict[str, torch.Tensor]]], out_dir: Path
             ) -> ClassifierResult:
    """Fine-tune one arm (``finetune_members`` at P = 1) into ``out_dir``."""
    return finetune_members([arm], [config], data, [encoder_states],
                            [out_dir / f"classifier_{arm}.safetensors"])[0]


class Twins(BaseModel):
    """The fine-tuned twins of one seed, by arm."""

    arms: dict[str, ClassifierResult]


def finetune_twins(config: PipelineConfig, data: Any, encoders: Sequence[LayerResult],
                   out_dir: Path) -> Twins:
    """Both arms of one seed as one population of two, in one pass over the data."""
    results = finetune_members(ARMS, [config, config], data, [layer_states(encoders), None],
                               [out_dir / f"classifier_{arm}.safetensors" for arm in ARMS])
    return Twins(arms=dict(zip(ARMS, results)))


def finetune_cache_key(arm: Arm, config: PipelineConfig, data_digest: str,
                       encoders: Optional[Sequence[LayerResult]]) -> str:
    """The random arm does not depend on pretraining, so changing it never invalidates it."""
    return stage_key(
        f"finetune-{arm}",
        kind="finetune",
        data=data_digest,
        model=config.model.model_dump(mode="json"),
        finetune=config.finetune.model_dump(mode="json"),
        runtime=runtime_key(config.runtime),
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


def twins_cache_key(config: PipelineConfig, data_digest: str,
                    encoders: Sequence[LayerResult]) -> str:
    """Both arms' keys: the twins are retrained together when either arm's inputs change."""
    return stage_key("finetune-twins", kind="finetune",
                     arms=[finetune_cache_key(arm, config, data_digest,
                                              encoders if arm == "pretrained" else None)
                           for arm in ARMS])


def _twins_key(ctx: Any, params: dict[str, Any]) -> str:
    return twins_cache_key(params["config"], params["data"].digest, params["encoders"])


@task(name="finetune-twins", cache_policy=CacheKeyFnPolicy(cache_key_fn=_twins_key),
      persist_result=True, result_serializer="json")
def finetune_twins_task(config: PipelineConfig, data: Any,
                        encoders: list[LayerResult]) -> Twins:
    """Prefect task: fine-tune the pretrained and random twins as one population."""
    key = twins_cache_key(config, data.digest, encoders)
    return finetune_twins(config, data, encoders, stage_dir("finetune-twins", key))
