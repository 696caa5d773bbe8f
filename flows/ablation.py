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

from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from prefect import flow
from pydantic import BaseModel

from config.grid import expand, grid_params
from config.grid_spec import GROUPING, Cell, Grid
from flows.submission import settle, submit_work
from tasks.ablation_plan import pretraining_plan
from runtime.worker_pool import retry_unless_stopping
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
    retry = {"retries": grid.retries, "retry_delay_seconds": grid.retry_delay_seconds,
             "retry_condition_fn": retry_unless_stopping}
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
    stop when this process is gone, and their tasks when it stops, ``runtime.worker_pool``);
    an existing Dask cluster (prefect-dask) when given its scheduler address."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    if workers > 1:
        from runtime.worker_pool import StoppingProcessPool

        return StoppingProcessPool(workers)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


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


def _precision(cells: list[Cell]) -> str:
    """The precisions the cells train in (``runtime.precision`` resolved), comma-separated."""
    from runtime.devices import precision_used

    return ",".join(sorted({precision_used(c.config.runtime) for c in cells})) or "32-true"


def _device(cells: list[Cell]) -> str:
    from runtime.devices import eval_device

    return str(eval_device(cells[0].config.runtime)) if cells else "cpu"
