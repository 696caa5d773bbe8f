"""The ablation's plan: which distinct pretraining layers the cells' stacks share, which
cells are the same fine-tuning run, and, with ``--population P``, which seeds train
together (``tasks.ablation_populations``). Pure functions of the grid's cells.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

from config.grid_spec import Cell
from config.stages import PipelineConfig
from tasks.pretrain import pretrain_cache_key


class LayerNode(NamedTuple):
    """One distinct pretraining layer: trained once, shared by every stack that has it."""

    key: str
    k: int
    config: PipelineConfig
    lower: tuple[str, ...]


def pretraining_plan(cells: list[Cell]) -> tuple[dict[str, LayerNode], dict[str, list[str]]]:
    """The distinct layers of every pretrained cell's stack, bottom up, and each cell's stack.

    Layer k is identified by its own ``pretrain_cache_key`` (layers below left out, the data
    config standing for the data) chained with the identity of layer k-1: so the depth-1 and
    depth-2 cells of a seed share layer 1, and cells that differ only in fine-tuning
    settings share the whole stack. Returns (nodes in topological order, cell id -> keys).
    """
    nodes: dict[str, LayerNode] = {}
    stacks: dict[str, list[str]] = {}
    for cell in cells:
        if cell.arm != "pretrained":
            continue
        chain: list[str] = []
        for k in range(cell.config.model.n_layers):
            own = pretrain_cache_key(k, cell.config, cell.config.data.digest(), [])
            key = hashlib.sha256(f"{chain[-1] if chain else ''}/{own}".encode()).hexdigest()
            nodes.setdefault(key, LayerNode(key, k, cell.config, tuple(chain)))
            chain.append(key)
        stacks[cell.id] = chain
    return nodes, stacks


def distinct_runs(cells: list[Cell]) -> dict[str, str]:
    """Each cell's representative: the first cell that is the same fine-tuning run.

    A random-init classifier does not depend on pretraining, so random cells that differ
    only in a pretraining factor (``corruption_level``, ``noise``; Vincent et al.'s ν) share
    one fine-tuning cache key (``tasks.finetune.finetune_cache_key``) and are trained once,
    whatever the task runner; each still gets its row. Every other cell is its own run.

    Returns:
        cell id -> the id of the cell that trains it (itself for a representative).
    """
    from tasks.finetune import finetune_cache_key

    first: dict[str, str] = {}
    alias = {}
    for cell in cells:
        if cell.arm == "random" and cell.config.objective == "classify":
            key = finetune_cache_key("random", cell.config, cell.config.data.digest(), None)
            alias[cell.id] = first.setdefault(key, cell.id)
        else:
            alias[cell.id] = cell.id
    return alias


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
    """Group the single-seed plan (``pretraining_plan``) into populations of
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
