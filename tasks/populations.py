"""Seeds trained as populations: the ablation's ``--population P`` path.

Cells that differ only in their seed are the same small network P times. Here P of them
train as one batched model (``models.population``): layer k of P pretraining stacks at
once, then P fine-tuning runs of one arm at once. Every member starts from the weights,
noise, data order and dropout seeds its single run would use (``tasks.pretrain.build_dae``,
``tasks.finetune.build_classifier``, ``tasks.runtime.derive_seed``), so member p is the
single run of its seed up to floating-point rounding (``tests/test_population.py``).

Each member's weights are written as the single stage writes them (a ``dae.safetensors`` /
``classifier_<arm>.safetensors`` checkpoint) and described by the same ``LayerResult`` /
``ClassifierResult``; downstream code cannot tell the difference, except by
``train_seconds``, which is the member's share of the population's wall time.

Cache keys are the members' single-run keys plus the population code's digest, never the
single-run keys themselves: a population result is not bit-identical to a single run, so
it must not be served to a single run from the cache, or the other way round.

When a population diverges (a NaN/inf loss in any member), it is retried member by member
through the single-run stages, so that only the members that really diverge are reported
as diverged and the others still finish.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import BaseModel

from tasks.checkpoints import Checkpoint, save_state, tensor_sha256
from tasks.config import PipelineConfig
from tasks.errors import DivergenceError
from tasks.finetune import (Arm, ClassifierResult, build_classifier, finetune_cache_key,
                            hidden_digests)
from tasks.pretrain import (LayerResult, build_dae, compute_codes, encoder_state, load_stack,
                            pretrain_cache_key)
from tasks.runtime import derive_seed, eval_device, stage_dir, stage_key


def population_key(stage: str, member_keys: Sequence[str]) -> str:
    """Cache key of a population: its members' single-run keys, in order (each carries its
    stage kind's behaviour version)."""
    return stage_key(f"{stage}-population", kind=stage.split("-")[0],
                     members=list(member_keys))


def check_members(configs: Sequence[PipelineConfig]) -> None:
    """Members must differ in ``runtime.seed`` only (and be distinct)."""
    if not configs:
        raise ValueError("a population needs at least one member")
    seeds = [c.runtime.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"population members need distinct seeds; got {seeds}")
    first = seedless(configs[0])
    for config in configs[1:]:
        if seedless(config) != first:
            raise ValueError("population members may differ in runtime.seed only")


def seedless(config: PipelineConfig) -> dict[str, Any]:
    """The config as JSON-able data without ``runtime.seed``: equal for population members."""
    dump = config.model_dump(mode="json")
    dump["runtime"].pop("seed")
    return dump


def _save_members(states: Sequence[dict[str, torch.Tensor]], seeds: Sequence[int],
                  out_dir: Path, filename: str, metadata: dict[str, str]) -> list[Checkpoint]:
    """Member p's weights as ``out_dir / f"member-{p}" / filename``."""
    return [save_state(state, out_dir / f"member-{i}" / filename,
                       {**metadata, "seed": str(seed), "population": str(len(states))})
            for i, (state, seed) in enumerate(zip(states, seeds))]


class PopulationLayers(BaseModel):
    """Layer k of each member's stack, in member order."""

    members: list[LayerResult]


class PopulationClassifiers(BaseModel):
    """One arm's fine-tuned classifier of each member, in member order."""

    members: list[ClassifierResult]


def pretrain_layer_population(k: int, configs: Sequence[PipelineConfig], data: Any,
                              lowers: Sequence[Sequence[LayerResult]], out_dir: Path
                              ) -> list[LayerResult]:
    """Layer ``k`` (0-based) of every member's stack, trained as one population.

    Args:
        configs: One config per member; they differ in ``runtime.seed`` only.
        data: The shared ``DataBundle``.
        lowers: Member p's layers 1..k (its own stack below layer k).
        out_dir: Member p's checkpoint goes to ``out_dir / f"member-{p}"``.
    Raises:
        DivergenceError: a member's loss became NaN/inf (the message names the members).
    """
    from models.population_training import train_dae_population

    check_members(configs)
    if len(lowers) != len(configs):
        raise ValueError(f"{len(lowers)} lower stacks for {len(configs)} members")
    config = configs[0]
    m, p, rt = config.model, config.pretrain, config.runtime
    device = eval_device(rt)
    states = [load_stack(lower) for lower in lowers]
    if k == 0:  # every member reads the same inputs
        x_train = data.x_train.to(device)
        x_valid = data.x_valid.to(device)
        ranges = [(float(x_train.min()), float(x_train.max()))] * len(configs)
    else:  # member p reads its own codes: (P, N, n_hidden_{k-1})
        x_train = torch.stack([compute_codes(data.x_train, s, m.activation, device,
                                             rt.eval_batch_size) for s in states])
        x_valid = torch.stack([compute_codes(data.x_valid, s, m.activation, device,
                                             rt.eval_batch_size) for s in states])
        ranges = [(float(x.min()), float(x.max())) for x in x_train]
    n_visible = x_train.shape[-1]
    daes = [build_dae(k, c, n_visible, r) for c, r in zip(configs, ranges)]
    seeds = [c.runtime.seed for c in configs]
    try:
        result = train_dae_population(
            daes, x_train, x_valid,
            noise_seeds=[derive_seed(s, "pretrain-noise", k) for s in seeds],
            order_seeds=[derive_seed(s, "pretrain-order", k) for s in seeds],
            epochs=p.epochs, batch_size=p.batch_size, optimizer=p.optimizer.model_dump(),
            eval_batch_size=rt.eval_batch_size)
    except FloatingPointError as exc:
        raise DivergenceError(f"pretraining layer {k + 1} of seeds {seeds}: {exc}") from exc
    share = result.seconds / len(configs)
    checkpoints = _save_members(result.states, seeds, out_dir, "dae.safetensors",
                                {"layer": str(k + 1)})
    return [LayerResult(
        layer=k + 1, n_visible=n_visible, n_hidden=m.hidden_sizes[k], checkpoint=checkpoint,
        encoder_sha256=tensor_sha256(encoder_state(state)), value_range=ranges[i],
        history=result.histories[i], figures={}, train_seconds=share)
        for i, (state, checkpoint) in enumerate(zip(result.states, checkpoints))]


def finetune_population(arm: Arm, configs: Sequence[PipelineConfig], data: Any,
                        encoders: Optional[Sequence[Sequence[LayerResult]]], out_dir: Path
                        ) -> list[ClassifierResult]:
    """One arm of every member, fine-tuned as one population; each member stops early on
    its own rule and ends with its own best validation weights.

    Args:
        arm: ``pretrained`` (needs ``encoders``: member p's full stack) or ``random``.
        configs: One config per member; they differ in ``runtime.seed`` only.
        out_dir: Member p's checkpoint goes to ``out_dir / f"member-{p}"``.
    Raises:
        DivergenceError: a member's loss became NaN/inf.
    """
    from models.population_training import train_classifier_population
    from tasks.pretrain import layer_states

    check_members(configs)
    if arm == "pretrained" and (encoders is None or len(encoders) != len(configs)):
        raise ValueError("the pretrained arm needs one encoder stack per member")
    config = configs[0]
    f, rt = config.finetune, config.runtime
    device = eval_device(rt)
    classifiers = [
        build_classifier(arm, c, data.n_features, data.n_classes,
                         layer_states(encoders[i]) if arm == "pretrained" else None)
        for i, c in enumerate(configs)]
    initial = [hidden_digests(c) for c in classifiers]
    seeds = [c.runtime.seed for c in configs]
    try:
        result = train_classifier_population(
            classifiers, data.x_train.to(device), data.y_train.to(device),
            data.x_valid.to(device), data.y_valid.to(device),
            order_seeds=[derive_seed(s, "finetune-order") for s in seeds],
            max_epochs=f.max_epochs, batch_size=f.batch_size,
            optimizer=f.optimizer.model_dump(), early_stopping=f.early_stopping,
            patience_batches=f.patience_batches, patience_increase=f.patience_increase,
            improvement_threshold=f.improvement_threshold, patience_epochs=f.patience_epochs,
            dropout_seeds=([derive_seed(s, "finetune-dropout") for s in seeds]
                           if config.model.dropout > 0 else None),
            eval_batch_size=rt.eval_batch_size)
    except FloatingPointError as exc:
        raise DivergenceError(f"fine-tuning the {arm} arm of seeds {seeds}: {exc}") from exc
    share = result.seconds / len(configs)
    checkpoints = _save_members(result.states, seeds, out_dir,
                                f"classifier_{arm}.safetensors", {"arm": arm})
    return [ClassifierResult(
        arm=arm, checkpoint=checkpoint, initial_hidden_sha256=initial[i],
        history=result.histories[i], best_val_error=result.best_val_error[i],
        best_epoch=result.best_epoch[i], epochs_run=len(result.histories[i]),
        stopped_early=result.stopped_early[i], train_seconds=share)
        for i, checkpoint in enumerate(checkpoints)]


def pretrain_population_key(k: int, configs: Sequence[PipelineConfig], data_digest: str,
                            lowers: Sequence[Sequence[LayerResult]]) -> str:
    return population_key("pretrain-layer", [
        pretrain_cache_key(k, c, data_digest, lower) for c, lower in zip(configs, lowers)])


def finetune_population_key(arm: Arm, configs: Sequence[PipelineConfig], data_digest: str,
                            encoders: Optional[Sequence[Sequence[LayerResult]]]) -> str:
    return population_key(f"finetune-{arm}", [
        finetune_cache_key(arm, c, data_digest, encoders[i] if encoders else None)
        for i, c in enumerate(configs)])


def pretrain_population_dir(k: int, key: str) -> Path:
    return stage_dir(f"pretrain-layer-{k + 1}-population", key)


def finetune_population_dir(arm: Arm, key: str) -> Path:
    return stage_dir(f"finetune-{arm}-population", key)


# --- Prefect tasks, cached on configs and digests like the single stages ------------------

def _pretrain_key_fn(ctx: Any, params: dict[str, Any]) -> str:
    return pretrain_population_key(params["k"], params["configs"], params["data"].digest,
                                   params["lowers"])


def _finetune_key_fn(ctx: Any, params: dict[str, Any]) -> str:
    return finetune_population_key(params["arm"], params["configs"], params["data"].digest,
                                   params.get("encoders"))


@task(name="pretrain-layer-population",
      cache_policy=CacheKeyFnPolicy(cache_key_fn=_pretrain_key_fn),
      persist_result=True, result_serializer="json")
def pretrain_population_task(k: int, configs: list[PipelineConfig], data: Any,
                             lowers: list[list[LayerResult]]) -> PopulationLayers:
    """Prefect task: layer k of every member's stack as one population."""
    key = pretrain_population_key(k, configs, data.digest, lowers)
    return PopulationLayers(members=pretrain_layer_population(
        k, configs, data, lowers, pretrain_population_dir(k, key)))


@task(name="finetune-population",
      cache_policy=CacheKeyFnPolicy(cache_key_fn=_finetune_key_fn),
      persist_result=True, result_serializer="json")
def finetune_population_task(arm: Arm, configs: list[PipelineConfig], data: Any,
                             encoders: Optional[list[list[LayerResult]]] = None
                             ) -> PopulationClassifiers:
    """Prefect task: one arm of every member as one population."""
    key = finetune_population_key(arm, configs, data.digest, encoders)
    return PopulationClassifiers(members=finetune_population(
        arm, configs, data, encoders, finetune_population_dir(arm, key)))
