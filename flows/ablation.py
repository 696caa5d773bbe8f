"""The pretraining-vs-random ablation (Erhan et al. 2010): every cell of a grid of factors
is a network fine-tuned from pretrained encoders or from a random initialisation, over many
seeds. Distinct pretraining layers are trained once and shared; every cell runs as a Prefect
task on the flow's task runner (in process, a local process pool or a Dask cluster); one
MLflow parent run holds the table, the summary statistics and the figures.

Tasks receive configs, never tensors: each worker loads the data itself (memoised per
process), so cells can run in other processes or on other machines, and every stage stays
cached on stable inputs. A rerun after an interruption resumes: finished layers and cells
come from the cache.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from prefect import flow
from pydantic import BaseModel

from config.grid import expand, grid_params
from config.grid_spec import GROUPING, Cell, Grid
from tasks.ablation_cells import CellOutcome, Status, pretrain_layer, run_cell
from tasks.ablation_plan import LayerNode, distinct_runs, population_plan, pretraining_plan
from tasks.ablation_populations import pretrain_population, run_population_cells
from reports.ablation_outputs import (AblationRuns, cell_row, format_summary, progress_line,
                                      record, summary_artifact, write_outputs)
from tracking.stale import end_dead_runs
from tracking.tracker import KIND_TAG, Tracker, environment_params


class AblationResult(BaseModel):
    """What ``layerwise ablate`` prints and tests check."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    out_dir: Path
    n_cells: int
    n_ok: int
    n_diverged: int
    failed: dict[str, str]
    files: dict[str, Path]
    summary_text: str


@flow(name="layerwise-ablation", validate_parameters=False)
def ablation(
    grid: Grid,
    home: str,
    out_dir: str,
    tracking_uri: Optional[str] = None,
    experiment: str = "layerwise",
    threads: Optional[int] = None,
    verbose: bool = True,
    population: int = 1,
) -> AblationResult:
    """Pretrained vs random initialisation over every cell of ``grid``, recorded in MLflow.

    ``population`` > 1 trains up to that many seeds of a layer or a cell as one batched
    model (``tasks.ablation_populations``); the table, runs and figures are the same.
    """
    echo = print if verbose else (lambda line: None)
    cells = expand(grid)  # 1. the plan: every cell, and the distinct pretraining layers
    nodes, stacks = pretraining_plan(cells)
    retry = {"retries": grid.retries, "retry_delay_seconds": grid.retry_delay_seconds}
    tracker = Tracker(tracking_uri, experiment)
    if killed := end_dead_runs(tracker.client, tracker.experiment):
        echo(f"  marked {len(killed)} MLflow run(s) of an earlier, killed attempt KILLED")
    with tracker.run(f"ablation-{grid.name}", {KIND_TAG: "ablation"}) as parent:
        tracker.log_params(parent, {**grid_params(grid), "preset": grid.name,
                                    "n_cells": len(cells), "n_pretrain_layers": len(nodes),
                                    "population": population,
                                    **environment_params(_device(cells), _precision(cells))})
        echo(f"ablation {grid.name}: {len(cells)} cells, {len(nodes)} distinct pretraining "
             f"layers, {grid.retries} retries per task")
        # A child run per cell and per layer, open from the start: epochs logged as they end.
        with AblationRuns(tracker, parent, cells, nodes, stacks) as runs:
            # 2-3. Layers, each once on the layers below it; cells on their stacks.
            futures, below, layers = submit_work(cells, nodes, stacks, population, home,
                                                 threads, retry, echo, runs)
            # 4. Settle: one row per cell, in grid order, its run ended; failures included.
            rows = []
            for i, cell in enumerate(cells, 1):
                outcome, status, error = settle(futures[cell.id], below[cell.id])
                rows.append(cell_row(cell, outcome, status, error))
                runs.log_cell(cell, rows[-1], outcome)
                echo(progress_line(i, len(cells), rows[-1]))
            for key, layer in layers.items():  # all done: the cells read them
                runs.log_layer(key, *settle(layer, []))
        # 5. Record: the table, its statistics and figures.
        table, files, text = record_table(tracker, parent, grid, rows, Path(out_dir))
    failed = {r["cell"]: r["error"] for r in rows if r["status"] == "failed"}
    return AblationResult(
        run_id=parent, experiment_id=tracker.experiment_id, tracking_uri=tracker.uri,
        out_dir=Path(out_dir), n_cells=len(cells), n_ok=int((table.status == "ok").sum()),
        n_diverged=int((table.status == "diverged").sum()), failed=failed, files=files,
        summary_text=text,
    )


def task_runner(workers: int = 1, dask_address: Optional[str] = None) -> Any:
    """In process and sequential for one worker; a local process pool for more (its workers
    stop when this process is gone, ``runtime.orphan_guard.watch_parent``); an existing Dask
    cluster (prefect-dask) when given its scheduler address."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    if workers > 1:
        from prefect.task_runners import ProcessPoolTaskRunner

        from runtime.orphan_guard import watch_parent

        return ProcessPoolTaskRunner(max_workers=workers, initializer=watch_parent,
                                     initargs=(os.getpid(),))
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


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


def record_table(tracker: Tracker, parent: str, grid: Grid, rows: list[dict[str, Any]],
                 out_dir: Path) -> tuple[Any, dict[str, Path], str]:
    """The tidy table, its summary statistics, the output files and the parent run's record.

    Returns:
        The table (one row per cell), the files written, and the summary as text.
    """
    import pandas as pd

    from reports.stats import summarize

    table = pd.DataFrame(rows)
    by = [c for c in GROUPING if c in grid.factors.listed() or (c == "objective" and c in table)]
    summary = summarize(table, by, resamples=grid.bootstrap.resamples,
                        level=grid.bootstrap.level, seed=grid.bootstrap.seed)
    files = write_outputs(out_dir, grid, table, summary, by)
    text = format_summary(summary, by, grid.bootstrap.level)
    if factor := grid.select_on_validation:  # chosen on validation, scored on test
        from reports.selection import (format_validation, select_on_validation,
                                       selection_keys, write_selection)

        chosen, means = select_on_validation(table, by, factor, grid.bootstrap.resamples,
                                             grid.bootstrap.level, grid.bootstrap.seed)
        files |= write_selection(out_dir, chosen, means)
        text += (f"\n\n{factor} chosen on validation (lowest mean validation error of the "
                 f"pretrained arm, *):\n{format_validation(means, factor)}\n\nTest error at "
                 f"the chosen {factor}:\n"
                 + format_summary(chosen, selection_keys(by, factor), grid.bootstrap.level))
    record(tracker, parent, table, files)
    summary_artifact(summary, grid)
    return table, files, text


def run_ablation(grid: Grid, workers: int = 1, dask_address: Optional[str] = None,
                 out_dir: Optional[Path] = None, threads: Optional[int] = 1,
                 population: int = 1, **kwargs: Any) -> AblationResult:
    """Run the flow on the chosen task runner, with cached task results under
    ``$LAYERWISE_HOME/prefect-results`` (shared with the pipeline) and outputs in ``out_dir``
    (default ``$LAYERWISE_HOME/ablations/<timestamp>``).

    ``population`` > 1 trains up to that many seeds as one batched model per task.

    ``threads`` is torch's CPU thread count in each worker (None: torch's default). One is
    the default because cells are small: on 2 cores the tiny grid takes 45 s at one thread
    and 200 s at two, and a grid is parallelised across cells (``workers``) instead.
    """
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from runtime.ephemeral_api import shared_settings
    from runtime.home import layerwise_home

    home = layerwise_home()
    if out_dir is None:
        out_dir = home / "ablations" / datetime.now().strftime("%Y%m%d-%H%M%S")
    runner = task_runner(workers, dask_address)
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: home / "prefect-results",
                             **shared_settings(workers > 1 and not dask_address)}):
        return ablation.with_options(task_runner=runner)(
            grid=grid, home=str(home), out_dir=str(Path(out_dir).resolve()), threads=threads,
            population=population, **kwargs)


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


def _precision(cells: list[Cell]) -> str:
    """The precisions the cells train in (``runtime.precision`` resolved), comma-separated."""
    from runtime.devices import precision_used

    return ",".join(sorted({precision_used(c.config.runtime) for c in cells})) or "32-true"


def _device(cells: list[Cell]) -> str:
    from runtime.devices import eval_device

    return str(eval_device(cells[0].config.runtime)) if cells else "cpu"
