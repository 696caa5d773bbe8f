"""The ablation's ``--population P`` path, flow side: which seeds train together.

Without populations every distinct pretraining layer and every cell is one task
(``flows.ablation``). With ``--population P``, the single-seed plan is grouped:

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

import hashlib
import json
import time
from typing import Any, NamedTuple, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.ablation_stages import (CellOutcome, LayerNode, LayerOutcome, score_cell, single_cell,
                                   single_layer, worker_data)
from config.grid_spec import Cell
from config.stages import PipelineConfig
from runtime.errors import DivergenceError

#: (position in the task's list of lower population results, member index there)
Slot = tuple[int, int]


class PopulationNode(NamedTuple):
    """Layer k of up to P stacks that differ only in their seed."""

    id: str
    k: int
    keys: tuple[str, ...]  # the members' single-plan layer keys, in seed order
    configs: tuple[PipelineConfig, ...]
    inputs: tuple[str, ...]  # ids of the population nodes below that the members read
    lower: tuple[tuple[Slot, ...], ...]  # member p's layers 1..k-1 in ``inputs``


class CellGroup(NamedTuple):
    """Up to P cells of one arm that differ only in their seed."""

    id: str
    cells: tuple[Cell, ...]
    inputs: tuple[str, ...]  # population node ids of the members' stacks
    stacks: tuple[tuple[Slot, ...], ...]  # member p's stack in ``inputs`` (empty: random)


def _seedless(config: PipelineConfig) -> str:
    from tasks.populations import seedless

    return json.dumps(seedless(config), sort_keys=True)


def _layer_family(k: int, config: PipelineConfig) -> str:
    """Identity of layer k of a stack with the seed left out: the settings of layers 1..k."""
    from tasks.pretrain import pretrain_cache_key

    unseeded = config.model_copy(update={"runtime": config.runtime.model_copy(
        update={"seed": 0})})
    own = [pretrain_cache_key(j, unseeded, config.data.digest(), []) for j in range(k + 1)]
    return hashlib.sha256("/".join(own).encode()).hexdigest()


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _slots(where: dict[str, tuple[str, int]], keys_per_member: list[tuple[str, ...]]
           ) -> tuple[tuple[str, ...], tuple[tuple[Slot, ...], ...]]:
    """The population nodes that hold the given single-plan layers, and each member's
    layers as (position among those nodes, member index)."""
    inputs: list[str] = []
    slots = []
    for keys in keys_per_member:
        member = []
        for key in keys:
            node_id, index = where[key]
            if node_id not in inputs:
                inputs.append(node_id)
            member.append((inputs.index(node_id), index))
        slots.append(tuple(member))
    return tuple(inputs), tuple(slots)


def population_plan(cells: list[Cell], nodes: dict[str, LayerNode],
                    stacks: dict[str, list[str]], size: int
                    ) -> tuple[dict[str, PopulationNode], list[CellGroup]]:
    """Group the single-seed plan (``flows.ablation_stages.pretraining_plan``) into populations of
    at most ``size`` members. Returns the population nodes, lower layers first, and the
    cell groups in grid order of their first cell."""
    if size < 1:
        raise ValueError(f"population size must be at least 1, got {size}")
    families: dict[tuple[int, str], list[LayerNode]] = {}
    for node in nodes.values():
        families.setdefault((node.k, _layer_family(node.k, node.config)), []).append(node)
    pop_nodes: dict[str, PopulationNode] = {}
    where: dict[str, tuple[str, int]] = {}  # single-plan layer key -> (population node, index)
    for (k, family), members in sorted(families.items(), key=lambda item: item[0][0]):
        members = sorted(members, key=lambda n: n.config.runtime.seed)
        for i, chunk in enumerate(_chunks(members, size)):
            node_id = f"{family[:12]}-{k}-{i}"
            inputs, lower = _slots(where, [n.lower for n in chunk])
            pop_nodes[node_id] = PopulationNode(node_id, k, tuple(n.key for n in chunk),
                                                tuple(n.config for n in chunk), inputs, lower)
            for index, n in enumerate(chunk):
                where[n.key] = (node_id, index)
    grouped: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        grouped.setdefault((cell.arm, _seedless(cell.config)), []).append(cell)
    groups = []
    for (arm, seedless), members in grouped.items():
        members = sorted(members, key=lambda c: c.config.runtime.seed)
        digest = hashlib.sha256(seedless.encode()).hexdigest()[:12]
        for i, chunk in enumerate(_chunks(members, size)):
            inputs, slots = _slots(where, [tuple(stacks.get(c.id, [])) for c in chunk])
            groups.append(CellGroup(f"{arm}-{digest}-{i}", tuple(chunk), inputs, slots))
    return pop_nodes, groups


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
def pretrain_population(k: int, configs: list[PipelineConfig], inputs: list[list[LayerOutcome]],
                        lower: list[list[Slot]], home: str, threads: Optional[int] = None
                        ) -> list[LayerOutcome]:
    """Layer k of every member's stack as one population (cached
    ``tasks.populations.pretrain_population_task``); members whose lower layers failed are
    passed over, and a diverged population is retried member by member."""
    from tasks.populations import pretrain_population_task

    below = _members(inputs, tuple(tuple(m) for m in lower))
    outcomes, ok = _pass_over_broken(below, LayerOutcome)
    if ok:
        data = worker_data(configs[0].data, home, threads)
        try:
            state = pretrain_population_task.with_options(
                task_run_name=f"pretrain-layer-{k + 1}-population")(
                k, [configs[i] for i in ok], data, [[o.layer for o in below[i]] for i in ok],
                return_state=True)
            trained = state.result().members
            for i, layer in zip(ok, trained):
                outcomes[i] = LayerOutcome(status="ok", layer=layer,
                                           cached=state.name == "Cached")
        except DivergenceError:  # find the members that diverge, one by one
            for i in ok:
                outcomes[i] = single_layer(k, configs[i], data, below[i])
    return outcomes


@task(name="ablation-cell-population", cache_policy=NO_CACHE, persist_result=False)
def run_population_cells(cells: list[Cell], inputs: list[list[LayerOutcome]],
                         stacks: list[list[Slot]], home: str, threads: Optional[int] = None
                         ) -> list[CellOutcome]:
    """Fine-tune one arm of every member as one population (cached
    ``tasks.populations.finetune_population_task``) and score each on the test split."""
    from tasks.populations import finetune_population_task

    started = time.perf_counter()
    arm = cells[0].arm
    stack_of = _members(inputs, tuple(tuple(s) for s in stacks))
    outcomes, ok = _pass_over_broken(stack_of, CellOutcome)
    if ok and cells[0].config.objective == "reconstruct":  # autoencoders: one cell at a time
        data = worker_data(cells[0].config.data, home, threads)
        for i in ok:
            outcomes[i] = single_cell(cells[i], stack_of[i], data, time.perf_counter())
    elif ok:
        data = worker_data(cells[0].config.data, home, threads)
        encoders = ([[o.layer for o in stack_of[i]] for i in ok] if arm == "pretrained"
                    else None)
        try:
            state = finetune_population_task.with_options(
                task_run_name=f"finetune-{arm}-population")(
                arm, [cells[i].config for i in ok], data, encoders, return_state=True)
            trained = state.result().members
            for i, result in zip(ok, trained):
                outcomes[i] = score_cell(cells[i].config, data, result,
                                         stack_of[i] if arm == "pretrained" else None,
                                         started, cached=state.name == "Cached")
        except DivergenceError:  # find the members that diverge, one by one
            for i in ok:
                outcomes[i] = single_cell(cells[i], stack_of[i], data, time.perf_counter())
    return outcomes


class MemberFuture:
    """Member ``index`` of a population task's future, read like a single task's future."""

    def __init__(self, future: Any, index: int):
        self.future, self.index = future, index

    def wait(self) -> None:
        self.future.wait()

    @property
    def state(self) -> Any:
        return self.future.state


def submit(cells: list[Cell], nodes: dict[str, LayerNode], stacks: dict[str, list[str]],
           size: int, home: str, threads: Optional[int], retry: dict[str, Any]
           ) -> tuple[dict[str, MemberFuture], dict[str, list[Any]], int]:
    """Submit every population task. Returns each cell's member future, the futures of the
    population layers its stack reads (for failure messages), and the number of tasks."""
    pop_nodes, groups = population_plan(cells, nodes, stacks, size)
    layers: dict[str, Any] = {}
    for node in pop_nodes.values():
        layers[node.id] = pretrain_population.with_options(
            task_run_name=f"layer-{node.k + 1}/{node.id[:8]}x{len(node.keys)}", **retry,
        ).submit(node.k, list(node.configs), [layers[i] for i in node.inputs],
                 [list(m) for m in node.lower], home, threads)
    futures: dict[str, MemberFuture] = {}
    below: dict[str, list[Any]] = {}
    for group in groups:
        future = run_population_cells.with_options(
            task_run_name=f"cells/{group.id}x{len(group.cells)}", **retry,
        ).submit(list(group.cells), [layers[i] for i in group.inputs],
                 [list(s) for s in group.stacks], home, threads)
        for index, cell in enumerate(group.cells):
            futures[cell.id] = MemberFuture(future, index)
            below[cell.id] = [layers[i] for i in group.inputs]
    return futures, below, len(pop_nodes) + len(groups)
