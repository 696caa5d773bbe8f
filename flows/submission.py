"""Submitting an ablation's tasks and settling their futures: every distinct pretraining
layer once, every distinct fine-tuning run on its stack (or, with ``--population P``, the
seeds grouped into population tasks), each told the MLflow run its epochs go to; then each
cell's outcome, or why it has none, read from its future. ``flows.ablation`` drives both.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

from config.grid_spec import Cell
from reports.ablation_outputs import AblationRuns
from tasks.ablation_cells import CellOutcome, Status, pretrain_layer, run_cell
from tasks.ablation_plan import CellGroup, LayerNode, distinct_runs, population_plan
from tasks.ablation_populations import pretrain_population, run_population_cells

T = TypeVar("T")


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
    keys = {cell.id: stacks.get(cell.id, []) for cell in cells}
    layers: dict[str, Any] = {}
    futures: dict[str, Any] = {}
    for item in ready_first([*nodes.values(), *cells],
                            lambda x: x.lower if isinstance(x, LayerNode) else keys[x.id]):
        if isinstance(item, LayerNode):
            layers[item.key] = pretrain_layer.with_options(
                task_run_name=f"layer-{item.k + 1}/{item.key[:8]}", **retry,
            ).submit(item.k, item.config, [layers[key] for key in item.lower], home, threads,
                     runs.layer_live(item.key))
        else:
            futures[item.id] = run_cell.with_options(task_run_name=f"cell/{item.id}", **retry) \
                .submit(item, [layers[key] for key in keys[item.id]], home, threads,
                        runs.live(item))
    below = {cell.id: [layers[key] for key in keys[cell.id]] for cell in cells}
    return futures, below, layers


def ready_first(items: Iterable[T], waits_on: Callable[[T], Sequence[Any]]) -> list[T]:
    """``items`` in submission order: those that wait for no other task first, then the rest,
    each part in its given order (so a layer still follows the layers below it).

    Prefect's process pool waits for a task's input futures in a pool of threads no larger
    than its pool of workers, in the order of submission, and a task that waits holds its
    thread. Submitted in plan order, the layers above layer 1 took every thread, and a task
    that needs nothing (a random-init cell, layer 1 of another seed) queued behind them:
    ``tutorial``'s random arm, which needs no pretraining, started only once layer 2 was
    done, with one of the two workers idle until then."""
    items = list(items)
    return [i for i in items if not waits_on(i)] + [i for i in items if waits_on(i)]


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
    futures: dict[str, MemberFuture] = {}
    below: dict[str, list[Any]] = {}
    for item in ready_first([*pop_nodes.values(), *groups], lambda x: x.inputs):
        if isinstance(item, CellGroup):
            future = run_population_cells.with_options(
                task_run_name=f"cells/{item.id}x{len(item.cells)}", **retry,
            ).submit(list(item.cells), [layers[i] for i in item.inputs],
                     [list(s) for s in item.stacks], home, threads,
                     [runs.live(cell) for cell in item.cells])
            for index, cell in enumerate(item.cells):
                futures[cell.id] = MemberFuture(future, index)
                below[cell.id] = [layers[i] for i in item.inputs]
        else:
            layers[item.id] = pretrain_population.with_options(
                task_run_name=f"layer-{item.k + 1}/{item.id[:8]}x{len(item.keys)}", **retry,
            ).submit(item.k, list(item.configs), [layers[i] for i in item.inputs],
                     [list(m) for m in item.lower], home, threads,
                     [runs.layer_live(key) for key in item.keys])
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
