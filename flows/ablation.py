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

import hashlib
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.grid import expand, grid_params
from flows.grid_spec import GROUPING, Cell, Grid
from tasks.config import DataConfig, PipelineConfig
from tasks.errors import DivergenceError
from tasks.pretrain import LayerResult, pretrain_cache_key, pretrain_layer_task
from flows.ablation_outputs import (cell_row, format_summary, log_cell, progress_line, record,
                                    summary_artifact, write_outputs)
from tasks.tracking import KIND_TAG, Tracker, environment_params

Status = Literal["ok", "diverged", "failed"]


# --- worker side: each process loads its own data ----------------------------------------

_DATA: dict[str, Any] = {}


def worker_data(cfg: DataConfig, home: str, threads: Optional[int]) -> Any:
    """The DataBundle of ``cfg``, loaded once per process. Also points this process at the
    caller's store (``home``) and thread count: workers get both as arguments, not env."""
    os.environ["LAYERWISE_HOME"] = home  # read by tasks.runtime.stage_dir in this process
    if threads:
        import torch

        torch.set_num_threads(threads)
    from tasks.data import load_data

    key = cfg.digest()
    if key not in _DATA:
        _DATA[key] = load_data(cfg)
    return _DATA[key]


class LayerOutcome(BaseModel):
    """A pretrained layer, or why there is none (a diverged layer, or one below it)."""

    status: Literal["ok", "diverged"]
    layer: Optional[LayerResult] = None
    error: str = ""
    cached: bool = False


class CellOutcome(BaseModel):
    """What one finished cell hands back to the flow."""

    status: Literal["ok", "diverged"]
    error: str = ""
    test_error: Optional[float] = None
    val_error: Optional[float] = None
    train_loss: Optional[float] = None
    epochs_run: Optional[int] = None
    train_seconds: Optional[float] = None
    pretrain_seconds: Optional[float] = None
    wall_seconds: float = 0.0
    cached: bool = False


@task(name="ablation-pretrain-layer", cache_policy=NO_CACHE, persist_result=False)
def pretrain_layer(k: int, config: PipelineConfig, lower: list[LayerOutcome], home: str,
                   threads: Optional[int] = None) -> LayerOutcome:
    """Layer k of a stack through the pipeline's own cached ``pretrain_layer_task``."""
    if broken := next((o for o in lower if o.status != "ok"), None):
        return LayerOutcome(status=broken.status, error=broken.error)
    return single_layer(k, config, worker_data(config.data, home, threads), lower)


def single_layer(k: int, config: PipelineConfig, data: Any,
                 lower: list[LayerOutcome]) -> LayerOutcome:
    """Layer k of one stack through the pipeline's cached ``pretrain_layer_task``."""
    try:
        state = pretrain_layer_task.with_options(task_run_name=f"pretrain-layer-{k + 1}")(
            k, config, data, [o.layer for o in lower], return_state=True)
        layer = state.result()
    except DivergenceError as exc:
        return LayerOutcome(status="diverged", error=f"pretraining layer {k + 1}: {exc}")
    return LayerOutcome(status="ok", layer=layer, cached=state.name == "Cached")


@task(name="ablation-cell", cache_policy=NO_CACHE, persist_result=False)
def run_cell(cell: Cell, stack: list[LayerOutcome], home: str,
             threads: Optional[int] = None) -> CellOutcome:
    """Fine-tune one cell (cached ``finetune_task``) and score it on the test split."""
    started = time.perf_counter()
    if broken := next((o for o in stack if o.status != "ok"), None):
        return CellOutcome(status=broken.status, error=broken.error)
    return single_cell(cell, stack, worker_data(cell.config.data, home, threads), started)


def single_cell(cell: Cell, stack: list[LayerOutcome], data: Any, started: float
                ) -> CellOutcome:
    """One cell through the pipeline's cached ``finetune_task``, scored on the test split."""
    from tasks.finetune import finetune_task

    config = cell.config
    encoders = [o.layer for o in stack] if cell.arm == "pretrained" else None
    try:
        state = finetune_task.with_options(task_run_name=f"finetune-{cell.arm}")(
            cell.arm, config, data, encoders, return_state=True)
        result = state.result()
    except DivergenceError as exc:
        return CellOutcome(status="diverged", error=f"fine-tuning: {exc}")
    return score_cell(config, data, result, stack if encoders else None, started,
                      cached=state.name == "Cached")


def score_cell(config: PipelineConfig, data: Any, result: Any,
               stack: Optional[list[LayerOutcome]], started: float, cached: bool
               ) -> CellOutcome:
    """A fine-tuned cell's outcome: its test error (the classifier's checkpoint, read back
    and verified) and how training went; ``stack`` is its pretraining (None: random)."""
    from tasks.evaluate import load_classifier, predict
    from tasks.runtime import eval_device

    model = load_classifier(result.checkpoint, config, data.n_features, data.n_classes)
    y_pred = predict(model, data.x_test, config.runtime.eval_batch_size, eval_device(config.runtime))
    return CellOutcome(
        status="ok",
        test_error=int((y_pred != data.y_test).sum()) / len(data.y_test),
        val_error=result.best_val_error,
        train_loss=result.history[-1]["train_loss"] if result.history else None,
        epochs_run=result.epochs_run,
        train_seconds=result.train_seconds,
        pretrain_seconds=sum(o.layer.train_seconds for o in stack) if stack else None,
        wall_seconds=time.perf_counter() - started,
        cached=cached,
    )


# --- flow side -----------------------------------------------------------------------------


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
    model (``flows.populations``); the table, runs and figures are the same.
    """
    import pandas as pd

    from tasks.stats import summarize

    echo = print if verbose else (lambda line: None)
    cells = expand(grid)
    nodes, stacks = pretraining_plan(cells)
    retry = {"retries": grid.retries, "retry_delay_seconds": grid.retry_delay_seconds}
    tracker = Tracker(tracking_uri, experiment)
    with tracker.run(f"ablation-{grid.name}", {KIND_TAG: "ablation"}) as parent:
        tracker.log_params(parent, {**grid_params(grid), "preset": grid.name,
                                    "n_cells": len(cells),
                                    "n_pretrain_layers": len(nodes),
                                    "population": population,
                                    **environment_params(_device(cells))})
        echo(f"ablation {grid.name}: {len(cells)} cells, {len(nodes)} distinct pretraining "
             f"layers, {grid.retries} retries per task")

        if population > 1:  # seeds of a layer or a cell trained as one batched model
            from flows.populations import submit

            futures, below, n_tasks = submit(cells, nodes, stacks, population, home,
                                             threads, retry)
            echo(f"  populations of up to {population} seeds: {n_tasks} tasks")
        else:
            # 1. Every distinct pretraining layer once, each on the layers below it.
            layers = {}
            for node in nodes.values():
                layers[node.key] = pretrain_layer.with_options(
                    task_run_name=f"layer-{node.k + 1}/{node.key[:8]}", **retry,
                ).submit(node.k, node.config, [layers[key] for key in node.lower], home,
                         threads)
            below = {cell.id: [layers[key] for key in stacks.get(cell.id, [])]
                     for cell in cells}

            # 2. Every cell: random-init arms at once, pretrained arms on their stack.
            futures = {cell.id: run_cell.with_options(task_run_name=f"cell/{cell.id}", **retry)
                       .submit(cell, below[cell.id], home, threads) for cell in cells}

        # 3. One row and one child run per cell, in grid order; failed cells included.
        rows = []
        for i, cell in enumerate(cells, 1):
            outcome, status, error = settle(futures[cell.id], below[cell.id])
            rows.append(cell_row(cell, outcome, status, error))
            log_cell(tracker, parent, cell, rows[-1])
            echo(progress_line(i, len(cells), rows[-1]))

        # 4. Table, statistics, figures.
        table = pd.DataFrame(rows)
        by = [c for c in GROUPING if c in grid.factors.listed()]
        summary = summarize(table, by, resamples=grid.bootstrap.resamples,
                            level=grid.bootstrap.level, seed=grid.bootstrap.seed)
        files = write_outputs(Path(out_dir), grid, table, summary, by)
        record(tracker, parent, table, files)
        text = format_summary(summary, by, grid.bootstrap.level)
        summary_artifact(summary, grid)
        failed = {r["cell"]: r["error"] for r in rows if r["status"] == "failed"}
    return AblationResult(
        run_id=parent, experiment_id=tracker.experiment_id, tracking_uri=tracker.uri,
        out_dir=Path(out_dir), n_cells=len(cells), n_ok=int((table.status == "ok").sum()),
        n_diverged=int((table.status == "diverged").sum()), failed=failed, files=files,
        summary_text=text,
    )


def task_runner(workers: int = 1, dask_address: Optional[str] = None) -> Any:
    """In process and sequential for one worker; a local process pool for more (its workers
    stop when this process is gone, ``flows.orphan_guard.watch_parent``); an existing Dask
    cluster (prefect-dask) when given its scheduler address."""
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    if workers > 1:
        from prefect.task_runners import ProcessPoolTaskRunner

        from flows.orphan_guard import watch_parent

        return ProcessPoolTaskRunner(max_workers=workers, initializer=watch_parent,
                                     initargs=(os.getpid(),))
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=1)


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

    from flows.ephemeral_api import shared_settings
    from tasks.runtime import layerwise_home

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
    """Wait for a cell; its outcome, status and error. A cell whose task failed after its
    retries, or whose pretraining task did, is ``failed`` with the task's message."""
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


def _device(cells: list[Cell]) -> str:
    from tasks.runtime import eval_device

    return str(eval_device(cells[0].config.runtime)) if cells else "cpu"
