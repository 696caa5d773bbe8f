"""Fine-tuning of the unrolled deep autoencoder on reconstruction, from the pretrained stack
and from random initialisation (Hinton & Salakhutdinov 2006). The two arms share
architecture, data order, budget and stopping rule; only the initial weights differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import BaseModel

from config.autoencoder import layer_activation
from config.stages import PipelineConfig
from runtime.checkpoints import save_state, tensor_sha256
from runtime.environment import (Seed, derive_seed, eval_device, fit, make_trainer, stage_dir,
                                 stage_key)
from runtime.errors import DivergenceError
from tasks.finetune import ARMS, Arm, ClassifierResult
from tasks.pretrain import LayerResult, load_stack


class AutoencoderResult(ClassifierResult):
    """A fine-tuned autoencoder arm: its checkpoint (``models.autoencoder`` state), the
    digests of its initial encoder layers, its history and stopping point (the best and
    stopping values are validation squared errors per image)."""


class AutoencoderTwins(BaseModel):
    """The fine-tuned autoencoders of one seed, by arm."""

    arms: dict[str, AutoencoderResult]


def activations(config: PipelineConfig) -> list[str]:
    """s_0 … s_{L−1}: the units of each encoder layer."""
    return [layer_activation(config, k) for k in range(config.model.n_layers)]


def initial_state(arm: Arm, config: PipelineConfig, n_features: int,
                  dae_states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Arm ``arm``'s autoencoder before fine-tuning: unrolled from the pretrained dA states,
    or the same shape drawn from ``derive_seed(seed, Seed.RANDOM_INIT)``."""
    from models.autoencoder import random_state, unrolled_state

    tied = config.autoencoder.tied_decoder
    if arm == "pretrained":
        if len(dae_states) != config.model.n_layers:
            raise ValueError(f"the pretrained arm needs {config.model.n_layers} dA states")
        return unrolled_state(dae_states, tied)
    g = torch.Generator().manual_seed(derive_seed(config.runtime.seed, Seed.RANDOM_INIT))
    return random_state([n_features, *config.model.hidden_sizes], activations(config),
                        config.model.init, tied, g)


def encoder_digests(state: dict[str, torch.Tensor], n_layers: int) -> list[str]:
    """Digest of each encoder layer's (W, b), named as ``EncoderLayer`` names them: equal
    to ``LayerResult.encoder_sha256`` for the pretrained arm's starting point."""
    return [tensor_sha256({"linear.weight": state[f"encoder.{l}.weight"],
                           "linear.bias": state[f"encoder.{l}.bias"]}) for l in range(n_layers)]


def finetune_autoencoders(config: PipelineConfig, data: Any, encoders: Sequence[LayerResult],
                          out_dir: Path) -> AutoencoderTwins:
    """Both arms of one seed as one population of two: one pass over the data, the same
    data order (``Seed.FINETUNE_ORDER`` of the one seed) by construction.

    Raises:
        DivergenceError: an arm's loss became NaN/inf (the message names it).
    """
    from models.autoencoder import AutoencoderPopulation
    from models.autoencoder_training import train_autoencoder_population

    f, rt = config.finetune, config.runtime
    device = eval_device(rt)
    dae_states = load_stack(encoders)
    states = [initial_state(arm, config, data.n_features, dae_states) for arm in ARMS]
    initial = [encoder_digests(s, config.model.n_layers) for s in states]
    population = AutoencoderPopulation(states, activations(config), config.autoencoder.loss)
    order = derive_seed(rt.seed, Seed.FINETUNE_ORDER)
    try:
        result = train_autoencoder_population(
            population.to(device), data.x_train.to(device), data.x_valid.to(device),
            order_seeds=[order] * len(ARMS), max_epochs=f.max_epochs,
            batch_size=f.batch_size, optimizer=f.optimizer.model_dump(),
            early_stopping=f.early_stopping, patience_batches=f.patience_batches,
            patience_increase=f.patience_increase,
            improvement_threshold=f.improvement_threshold, patience_epochs=f.patience_epochs,
            eval_batch_size=rt.eval_batch_size, stage="autoencoder fine-tuning",
            names=[f"autoencoder/{a} (seed {rt.seed})" for a in ARMS],
            trainer=make_trainer(rt, f.max_epochs), fit=fit)
    except FloatingPointError as exc:
        raise DivergenceError(f"{exc}. Lower finetune.optimizer.lr.") from exc
    arms = {}
    for i, (arm, state) in enumerate(zip(ARMS, result.states)):
        checkpoint = save_state(state, out_dir / f"autoencoder_{arm}.safetensors",
                                {"arm": arm, "seed": str(rt.seed)})
        arms[arm] = AutoencoderResult(
            arm=arm, checkpoint=checkpoint, initial_hidden_sha256=initial[i],
            history=result.histories[i], best_val_error=result.best_val_error[i],
            best_epoch=result.best_epoch[i], epochs_run=len(result.histories[i]),
            stopped_early=result.stopped_early[i], train_seconds=result.seconds / len(ARMS))
    return AutoencoderTwins(arms=arms)


def autoencoders_cache_key(config: PipelineConfig, data_digest: str,
                           encoders: Sequence[LayerResult]) -> str:
    """What the two arms read: the data, the architecture, the autoencoder and fine-tuning
    sections, the seed and the pretrained checkpoints."""
    return stage_key(
        "finetune-autoencoders", kind="reconstruct", data=data_digest,
        model=config.model.model_dump(mode="json"),
        autoencoder=config.autoencoder.model_dump(mode="json", exclude={"knn_k"}),
        finetune=config.finetune.model_dump(mode="json"),
        runtime=config.runtime.model_dump(mode="json", exclude={"eval_batch_size"}),
        encoders=[r.checkpoint.sha256 for r in encoders])


def _cache_key(ctx: Any, params: dict[str, Any]) -> str:
    return autoencoders_cache_key(params["config"], params["data"].digest, params["encoders"])


@task(name="finetune-autoencoders", cache_policy=CacheKeyFnPolicy(cache_key_fn=_cache_key),
      persist_result=True, result_serializer="json")
def finetune_autoencoders_task(config: PipelineConfig, data: Any,
                               encoders: list[LayerResult]) -> AutoencoderTwins:
    """Prefect task: fine-tune the pretrained and random-init autoencoders together."""
    key = autoencoders_cache_key(config, data.digest, encoders)
    return finetune_autoencoders(config, data, encoders, stage_dir("finetune-autoencoders", key))
