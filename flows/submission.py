"""Submitting an ablation's tasks and settling their futures: every distinct pretraining
layer once, every distinct fine-tuning run on its stack (or, with ``--population P``, the
seeds grouped into population tasks), each told the MLflow run its epochs go to; then each
cell's outcome, or why it has none, read from its future. ``flows.ablation`` drives both.
"""

from __future__ import annotations

from typing import Any, Optional

from config.grid_spec import Cell
from reports.ablation_outputs import AblationRuns
from tasks.ablation_cells import CellOutcome, Status, pretrain_layer, run_cell
from tasks.ablation_plan import LayerNode, distinct_runs, population_plan
from tasks.ablation_populations import pretrain_population, run_population_cells


def submit_work(cells: list[Cell], nodes: dict[str, Any], stacks: dict[str, list[str]],
                population: int, home: str, threads: Optional[int], retry: dict[str, Any],
                echo: Any, runs: AblationRuns
                ) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, Any]]:
    """Submit every distinct pretraining layer once and every distinct run on its stack
    (``distinct_runs``: a cell that is the same run as an earlier one shares its future).
    Each task logs its epochs to its run in ``runs`` as they end (a cell that shares
    another's run gets its history when it settles).

    Returns:
        The cells' futures by cell id, each cell's pretraining futures (bottom first), and
        each distinct layer's future by key.
    """
    alias = distinct_runs(cells)
    distinct = [c for c in cells if alias[c.id] == c.id]
    futures, below, layers = _submit(distinct, nodes, stacks, population, home, threads,
                                     retry, echo, runs)
    if len(distinct) < len(cells):
        echo(f"  {len(cells) - len(distinct)} cells repeat the random-init run of another "
             "cell (they differ only in pretraining settings)")
    return ({c.id: futures[alias[c.id]] for c in cells},
            {c.id: below[alias[c.id]] for c in cells}, layers)


def _submit(cells: list[Cell], nodes: dict[str, Any], stacks: dict[str, list[str]],
            population: int, home: str, threads: Optional[int], retry: dict[str, Any],
            echo: Any, runs: AblationRuns
            ) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, Any]]:
    if population > 1:  # seeds of a layer or a cell trained as one batched model
        futures, below, layers, n_tasks = submit_populations(
            cells, nodes, stacks, population, home, threads, retry, runs)
        echo(f"  populations of up to {population} seeds: {n_tasks} tasks")
        return futures, below, layers
    layers: dict[str, Any] = {}
    for node in nodes.values():  # the plan lists a layer after the layers below it
        layers[node.key] = pretrain_layer.with_options(
            task_run_name=f"layer-{node.k + 1}/{node.key[:8]}", **retry,
        ).submit(node.k, node.config, [layers[key] for key in node.lower], home, threads,
                 runs.layer_live(node.key))
    below = {cell.id: [layers[key] for key in stacks.get(cell.id, [])] for cell in cells}
    futures = {cell.id: run_cell.with_options(task_run_name=f"cell/{cell.id}", **retry)
               .submit(cell, below[cell.id], home, threads, runs.live(cell))
               for cell in cells}
    return futures, below, layers


class MemberFuture:
    """Member ``index`` of a population task's future, read like a single task's future."""

    def __init__(self, future: Any, index: int):
        self.future, self.index = future, index

    def wait(self) -> None:
        self.future.wait()

    @property
    def state(self) -> Any:
        return self.future.state


def submit_populations(cells: list[Cell], nodes: dict[str, LayerNode],
                       stacks: dict[str, list[str]], size: int, home: str,
                       threads: Optional[int], retry: dict[str, Any], runs: AblationRuns
                       ) -> tuple[dict[str, MemberFuture], dict[str, list[Any]],
                                  dict[str, MemberFuture], int]:
    """Submit every population task. Returns each cell's member future, the futures of the
    population layers its stack reads (for failure messages), each distinct layer's member
    future by key, and the number of tasks."""
    pop_nodes, groups = population_plan(cells, nodes, stacks, size)
    layers: dict[str, Any] = {}
    for node in pop_nodes.values():
        layers[node.id] = pretrain_population.with_options(
            task_run_name=f"layer-{node.k + 1}/{node.id[:8]}x{len(node.keys)}", **retry,
        ).submit(node.k, list(node.configs), [layers[i] for i in node.inputs],
                 [list(m) for m in node.lower], home, threads,
                 [runs.layer_live(key) for key in node.keys])
    futures: dict[str, MemberFuture] = {}
    below: dict[str, list[Any]] = {}
    for group in groups:
        future = run_population_cells.with_options(
            task_run_name=f"cells/{group.id}x{len(group.cells)}", **retry,
        ).submit(list(group.cells), [layers[i] for i in group.inputs],
                 [list(s) for s in group.stacks], home, threads,
                 [runs.live(cell) for cell in group.cells])
        for index, cell in enumerate(group.cells):
            futures[cell.id] = MemberFuture(future, index)
            below[cell.id] = [layers[i] for i in group.inputs]
    members = {key: MemberFuture(layers[node.id], index)
               for node in pop_nodes.values() for index, key in enumerate(node.keys)}
    return futures, below, members, len(pop_nodes) + len(groups)


def settle(future: Any, stack: list[Any]) -> tuple[Optional[CellOutcome], Status, str]:
    """Wait for a cell (or a layer); its outcome, status and error. A cell whose task
    failed after its retries, or whose pretraining task did, is ``failed`` with the task's
    message."""
    try:
        future.wait()
        state = future.state
        if state.is_completed():
            outcome = state.result()
            if isinstance(index := getattr(future, "index", None), int):
                outcome = outcome[index]  # a member of a population task
            return outcome, outcome.status, outcome.error
        if state.is_pending():  # NotReady: a layer below failed; report that layer's error
            for layer in stack:
                layer.wait()
                if not layer.state.is_completed():
                    return None, "failed", f"pretraining failed: {layer.state.message}"
        return None, "failed", state.message or state.name
    except Exception as exc:  # noqa: BLE001 - a crashed worker fails its cell, not the flow
        return None, "failed", describe(exc)


def describe(exc: BaseException) -> str:
    """``Type: message``, followed by each cause in the chain: Prefect wraps a failed
    upstream future as "Failed to resolve inputs", which alone says nothing of why."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " <- caused by ".join(parts)
