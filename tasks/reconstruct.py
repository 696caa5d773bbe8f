"""Fine-tuning of the unrolled deep autoencoder on reconstruction, from the pretrained stack
and from random initialisation (Hinton & Salakhutdinov 2006). The two arms share
architecture, data order, budget and stopping rule; only the initial weights differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import BaseModel

from config.autoencoder import layer_activation
from config.stages import PipelineConfig
from runtime.checkpoints import save_state, tensor_sha256
from runtime.progress import current_observer
from runtime.devices import eval_device
from runtime.keys import Seed, derive_seed, stage_dir, runtime_key, stage_key
from training.trainer import make_trainer
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


def autoencoder_members(arms: Sequence[Arm], configs: Sequence[PipelineConfig], data: Any,
                        dae_stacks: Sequence[Sequence[dict[str, torch.Tensor]]],
                        paths: Sequence[Path]) -> list[AutoencoderResult]:
    """Fine-tune P >= 1 autoencoders as one population: the two arms of one seed, or one
    arm of several seeds (the ablation). Member p reads the data order of its seed
    (``Seed.FINETUNE_ORDER``): the arms of a seed share it by construction.

    Args:
        arms: Member p's arm.
        configs: Member p's config; they differ in ``runtime.seed`` only.
        data: The shared ``DataBundle``.
        dae_stacks: Member p's pretrained dA states (ignored for the random arm).
        paths: Where member p's safetensors go.
    Raises:
        DivergenceError: a member's loss became NaN/inf (the message names it).
    """
    from models.autoencoder import AutoencoderPopulation
    from training.autoencoder_training import train_autoencoder_population
    from training.stopping_rules import rule_of
    from tasks.pretrain import seedless

    if not len(arms) == len(configs) == len(dae_stacks) == len(paths) > 0:
        raise ValueError("give one arm, config, dA stack and path per member")
    if any(seedless(c) != seedless(configs[0]) for c in configs):
        raise ValueError("members must differ in runtime.seed only")
    f, rt = configs[0].finetune, configs[0].runtime
    seeds = [c.runtime.seed for c in configs]
    states = [initial_state(a, c, data.n_features, s)
              for a, c, s in zip(arms, configs, dae_stacks)]
    initial = [encoder_digests(s, configs[0].model.n_layers) for s in states]
    population = AutoencoderPopulation(states, activations(configs[0]),
                                       configs[0].autoencoder.loss)
    device = eval_device(rt)
    try:
        result = train_autoencoder_population(
            population.to(device), data.x_train.to(device), data.x_valid.to(device),
            order_seeds=[derive_seed(s, Seed.FINETUNE_ORDER) for s in seeds],
            batch_size=f.batch_size,
            optimizer={**f.optimizer.model_dump(), "fused": rt.fused_update},
            stopping=rule_of(f),
            eval_batch_size=rt.eval_batch_size, stage="autoencoder fine-tuning",
            names=[f"autoencoder/{a} (seed {s})" for a, s in zip(arms, seeds)],
            trainer=make_trainer(rt, f.max_epochs),
            observer=current_observer(), resume_dir=Path(paths[0]).parent / "resume",
            checkpoint_seconds=rt.checkpoint_seconds)
    except FloatingPointError as exc:
        raise DivergenceError(f"{exc}. Lower finetune.optimizer.lr.") from exc
    return [AutoencoderResult(
        arm=arm, checkpoint=save_state(state, path, {"arm": arm, "seed": str(seed)}),
        initial_hidden_sha256=initial[i], history=result.histories[i],
        best_val_error=result.best_val_error[i], best_epoch=result.best_epoch[i],
        epochs_run=len(result.histories[i]), stopped_early=result.stopped_early[i],
        train_seconds=result.seconds, trained_together=len(arms))
        for i, (arm, seed, state, path) in enumerate(zip(arms, seeds, result.states, paths))]


def finetune_autoencoders(config: PipelineConfig, data: Any, encoders: Sequence[LayerResult],
                          out_dir: Path) -> AutoencoderTwins:
    """Both arms of one seed as one population of two, in one pass over the data."""
    stack = load_stack(encoders)
    results = autoencoder_members(ARMS, [config, config], data, [stack, []],
                                  [out_dir / f"autoencoder_{arm}.safetensors" for arm in ARMS])
    return AutoencoderTwins(arms=dict(zip(ARMS, results)))


def autoencoders_cache_key(config: PipelineConfig, data_digest: str,
                           encoders: Sequence[LayerResult]) -> str:
    """What the two arms read: the data, the architecture, the autoencoder and fine-tuning
    sections, the seed and the pretrained checkpoints."""
    return stage_key(
        "finetune-autoencoders", kind="reconstruct", data=data_digest,
        model=config.model.model_dump(mode="json"),
        autoencoder=config.autoencoder.model_dump(mode="json", exclude={"knn_k"}),
        finetune=config.finetune.model_dump(mode="json"),
        runtime=runtime_key(config.runtime),
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


def autoencoder_cache_key(arm: Arm, config: PipelineConfig, data_digest: str,
                          encoders: Optional[Sequence[LayerResult]]) -> str:
    """One arm's key (the ablation's cells): the random arm reads no pretraining."""
    return stage_key(
        f"finetune-autoencoder-{arm}", kind="reconstruct", data=data_digest,
        model=config.model.model_dump(mode="json"),
        autoencoder=config.autoencoder.model_dump(mode="json", exclude={"knn_k"}),
        finetune=config.finetune.model_dump(mode="json"),
        runtime=runtime_key(config.runtime),
        encoders=[r.checkpoint.sha256 for r in encoders or []] if arm == "pretrained" else [])


def _arm_key(ctx: Any, params: dict[str, Any]) -> str:
    return autoencoder_cache_key(params["arm"], params["config"], params["data"].digest,
                                 params.get("encoders"))


@task(name="finetune-autoencoder", cache_policy=CacheKeyFnPolicy(cache_key_fn=_arm_key),
      persist_result=True, result_serializer="json")
def finetune_autoencoder_task(arm: Arm, config: PipelineConfig, data: Any,
                              encoders: Optional[list[LayerResult]] = None
                              ) -> AutoencoderResult:
    """Prefect task: fine-tune one arm's autoencoder (P = 1), as an ablation cell does."""
    key = autoencoder_cache_key(arm, config, data.digest, encoders)
    stack = load_stack(encoders) if arm == "pretrained" else []
    return autoencoder_members([arm], [config], data, [stack], [stage_dir(
        f"finetune-autoencoder-{arm}", key) / f"autoencoder_{arm}.safetensors"])[0]
