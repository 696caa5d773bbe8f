"""Seeds trained as populations: the ablation's ``--population P`` path.

Cells that differ only in their seed are the same small network P times. Here P of them
train as one population of the engine (``training.engine``): layer k of P pretraining stacks
at once (``tasks.pretrain.pretrain_layers``), then P fine-tuning runs of one arm at once
(``tasks.finetune.finetune_members``). These are the functions a single run calls with
P = 1, so member p starts from the weights, noise, data order and dropout seeds of its
single run and equals it up to floating-point rounding (``tests/test_population.py``).

Each member's files and result records are those of a single run, in
``out_dir / f"member-{p}"``. A layer's ``train_seconds`` is the member's share of the
wall time; a fine-tuned member's is the population's wall time, ``trained_together`` its
number of members (the ablation's table shows the share).

Cache keys are the members' single-run keys under a population stage name, never the
single-run keys themselves: a population result is not bit-identical to a single run, so
it must not be served to a single run from the cache, or the other way round.

When a population diverges (a NaN/inf loss in any member), it is retried member by member
through the single-run stages, so that only the members that really diverge are reported
as diverged and the others still finish.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from prefect import task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic import BaseModel

from config.stages import PipelineConfig
from tasks.finetune import Arm, ClassifierResult, finetune_cache_key, finetune_members
from tasks.pretrain import (LayerResult, check_members, layer_states, pretrain_cache_key,
                            pretrain_layers, seedless)
from runtime.keys import stage_dir, stage_key

__all__ = ["check_members", "seedless", "pretrain_layer_population", "finetune_population"]


def population_key(stage: str, member_keys: Sequence[str]) -> str:
    """Cache key of a population: its members' single-run keys, in order (each carries its
    stage kind's behaviour version)."""
    return stage_key(f"{stage}-population", kind=stage.split("-")[0],
                     members=list(member_keys))


class PopulationLayers(BaseModel):
    """Layer k of each member's stack, in member order."""

    members: list[LayerResult]


class PopulationClassifiers(BaseModel):
    """One arm's fine-tuned classifier of each member, in member order."""

    members: list[ClassifierResult]


def _member_dirs(out_dir: Path, P: int) -> list[Path]:
    return [out_dir / f"member-{p}" for p in range(P)]


def pretrain_layer_population(k: int, configs: Sequence[PipelineConfig], data: Any,
                              lowers: Sequence[Sequence[LayerResult]], out_dir: Path
                              ) -> list[LayerResult]:
    """Layer ``k`` (0-based) of every member's stack, trained as one population; member
    p's files go to ``out_dir / f"member-{p}"``."""
    return pretrain_layers(k, configs, data, lowers, _member_dirs(out_dir, len(configs)))


def finetune_population(arm: Arm, configs: Sequence[PipelineConfig], data: Any,
                        encoders: Optional[Sequence[Sequence[LayerResult]]], out_dir: Path
                        ) -> list[ClassifierResult]:
    """One arm of every member (``encoders``: member p's full stack, for the pretrained arm),
    fine-tuned as one population; member p's checkpoint goes to ``out_dir / f"member-{p}"``.
    """
    check_members(configs)
    if arm == "pretrained" and (encoders is None or len(encoders) != len(configs)):
        raise ValueError("the pretrained arm needs one encoder stack per member")
    states = [layer_states(encoders[i]) if arm == "pretrained" else None
              for i in range(len(configs))]
    paths = [d / f"classifier_{arm}.safetensors"
             for d in _member_dirs(out_dir, len(configs))]
    return finetune_members([arm] * len(configs), configs, data, states, paths)


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
