"""The ablation's ``--population P`` path: the tasks that train seeds together.

Without populations every distinct pretraining layer and every cell is one task
(``tasks.ablation_cells``). With ``--population P``, the single-seed plan is grouped
(``tasks.ablation_plan.population_plan``):

- **layers**: the distinct layers of ``pretraining_plan`` that are the same layer of the
  same stack except for the seed (a *family*) are sorted by seed and cut into chunks of at
  most P; each chunk is one task, ``pretrain_population``, that trains layer k of every
  member at once on each member's own layers below;
- **cells**: cells that differ only in their seed and share an arm are sorted by seed and
  cut into chunks of at most P; each chunk is one task, ``run_population_cells``.

Each member still gets its own row in the table and its own MLflow child run: the flow
reads member i of a chunk's result where it would read a single task's.

A member whose pretraining diverged (or sits on a layer that did) is reported as such and
left out of the populations above it; the others go on. A population that diverges is
retried member by member through the single-run stages, so that only the seeds that really
diverge are marked diverged.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE

from config.grid_spec import Cell
from config.stages import PipelineConfig
from runtime.errors import DivergenceError
from runtime.progress import watching
from runtime.worker_pool import stops_with_the_run
from tasks.ablation_cells import (CellOutcome, LayerOutcome, LiveRun, ResumePoints,
                                  score_cell, single_cell, single_layer, watchers,
                                  worker_data)
from training.observer import Observers
from tasks.ablation_plan import Slot


def _pass_over_broken(stacks: list[list[LayerOutcome]], outcome: type
                      ) -> tuple[list[Any], list[int]]:
    """Each member's outcome when a layer of its stack did not finish (that layer's status
    and error), else None; and the indices of the members that can go on."""
    outcomes: list[Any] = [None] * len(stacks)
    ok = []
    for i, stack in enumerate(stacks):
        if broken := next((o for o in stack if o.status != "ok"), None):
            outcomes[i] = outcome(status=broken.status, error=broken.error)
        else:
            ok.append(i)
    return outcomes, ok


def _members(results: list[list[Any]], slots: tuple[tuple[Slot, ...], ...]) -> list[list[Any]]:
    return [[results[pos][index] for pos, index in member] for member in slots]


@task(name="ablation-pretrain-population", cache_policy=NO_CACHE, persist_result=False)
@stops_with_the_run
def pretrain_population(k: int, configs: list[PipelineConfig], inputs: list[list[LayerOutcome]],
                        lower: list[list[Slot]], home: str, threads: Optional[int] = None,
                        live: Optional[list[Optional[LiveRun]]] = None) -> list[LayerOutcome]:
    """Layer k of every member's stack as one population (cached
    ``tasks.populations.pretrain_population_task``); members whose lower layers failed are
    passed over, and a diverged population is retried member by member. Member i's
    epochs go to ``live[i]`` as they end."""
    from tasks.populations import pretrain_population_task

    live = live or [None] * len(configs)
    below = _members(inputs, tuple(tuple(m) for m in lower))
    outcomes, ok = _pass_over_broken(below, LayerOutcome)
    if ok:
        data = worker_data(configs[0].data, home, threads)
        name = f"pretrain-layer-{k + 1}-population"
        try:
            with watching(watchers(name, f"pretrain/layer_{k + 1}",
                                   {member: live[i] for member, i in enumerate(ok)})):
                state = pretrain_population_task.with_options(task_run_name=name)(
                    k, [configs[i] for i in ok], data,
                    [[o.layer for o in below[i]] for i in ok], return_state=True)
                trained = state.result().members
            for i, layer in zip(ok, trained):
                outcomes[i] = LayerOutcome(status="ok", layer=layer,
                                           cached=state.name == "Cached")
        except DivergenceError:  # find the members that diverge, one by one
            for i in ok:
                outcomes[i] = single_layer(k, configs[i], data, below[i], live[i])
    return outcomes


@task(name="ablation-cell-population", cache_policy=NO_CACHE, persist_result=False)
@stops_with_the_run
def run_population_cells(cells: list[Cell], inputs: list[list[LayerOutcome]],
                         stacks: list[list[Slot]], home: str, threads: Optional[int] = None,
                         live: Optional[list[Optional[LiveRun]]] = None) -> list[CellOutcome]:
    """Fine-tune one arm of every member as one population (cached
    ``tasks.populations.finetune_population_task``) and score each on the test split; cell
    i's epochs go to ``live[i]`` as they end."""
    from tasks.populations import finetune_population_task

    started = time.perf_counter()
    arm = cells[0].arm
    live = live or [None] * len(cells)
    stack_of = _members(inputs, tuple(tuple(s) for s in stacks))
    outcomes, ok = _pass_over_broken(stack_of, CellOutcome)
    if ok and cells[0].config.objective == "reconstruct":  # autoencoders: one cell at a time
        data = worker_data(cells[0].config.data, home, threads)
        for i in ok:
            outcomes[i] = single_cell(cells[i], stack_of[i], data, time.perf_counter(),
                                      live[i])
    elif ok:
        data = worker_data(cells[0].config.data, home, threads)
        encoders = ([[o.layer for o in stack_of[i]] for i in ok] if arm == "pretrained"
                    else None)
        resumed = ResumePoints()
        try:
            name = f"finetune-{arm}-population"
            with watching(Observers(resumed, watchers(
                    name, "finetune", {member: live[i] for member, i in enumerate(ok)}))):
                state = finetune_population_task.with_options(task_run_name=name)(
                    arm, [cells[i].config for i in ok], data, encoders, return_state=True)
                trained = state.result().members
            for member, (i, result) in enumerate(zip(ok, trained)):
                outcomes[i] = score_cell(cells[i].config, data, result,
                                         stack_of[i] if arm == "pretrained" else None,
                                         started, cached=state.name == "Cached",
                                         resumed=resumed.epochs.get(member, 0))
        except DivergenceError:  # find the members that diverge, one by one
            for i in ok:
                outcomes[i] = single_cell(cells[i], stack_of[i], data, time.perf_counter(),
                                          live[i])
    return outcomes
