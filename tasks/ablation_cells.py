"""The ablation's tasks, what a worker runs: one pretraining layer or one cell through the
pipeline's own cached tasks, on data the worker loads itself. ``flows.submission`` submits
them, one task per distinct layer and per cell (``tasks.ablation_plan``), or grouped into
populations of seeds (``tasks.ablation_populations``).
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal, Mapping, Optional

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from config.grid_spec import Cell
from config.stages import DataConfig, PipelineConfig
from training.observer import EpochObserver, Observers
from runtime.errors import DivergenceError
from runtime.progress import ProgressLine, watching
from runtime.worker_pool import stops_with_the_run
from tracking.live import LiveRun, retried_live_metrics
from tasks.pretrain import LayerResult, pretrain_layer_task

Status = Literal["ok", "diverged", "failed"]


# --- worker side: each process loads its own data ----------------------------------------

_DATA: dict[str, Any] = {}


def worker_data(cfg: DataConfig, home: str, threads: Optional[int]) -> Any:
    """The DataBundle of ``cfg``, loaded once per process. Also points this process at the
    caller's store (``home``) and thread count: workers get both as arguments, not env.

    Raises:
        KeyboardInterrupt: this worker was interrupted, or the run that owns it is stopping
            (a task the pool had queued before the run stopped starts no training).
    """
    from runtime.interrupts import raise_pending_interrupt
    from runtime.orphan_guard import stop_requested

    if stop_requested():
        raise KeyboardInterrupt("the run is stopping")
    raise_pending_interrupt()
    os.environ["LAYERWISE_HOME"] = home  # read by runtime.keys.stage_dir in this process
    if threads:
        import torch

        torch.set_num_threads(threads)
    from tasks.data import load_data

    key = cfg.digest()
    if key not in _DATA:
        _DATA[key] = load_data(cfg)
    return _DATA[key]


def watchers(label: str, prefix: str, runs: Mapping[int, Optional[LiveRun]]
             ) -> EpochObserver:
    """What watches a stage a worker trains: member p's epochs in its MLflow run
    ``runs[p]`` under ``prefix`` as they end, and a progress line per epoch
    (``epoch 3 of at most 40, 1.2 s/epoch, …``) in the task run's Prefect log."""
    return Observers(retried_live_metrics(runs, prefix, _warn), ProgressLine(label, _info))


def _warn(text: str) -> None:
    _log(text, "warning")


def _info(line: str, console: bool) -> None:
    _log(line.strip(), "info")  # Prefect's log only: its console handler shows warnings


def _log(text: str, level: str) -> None:
    from prefect.logging import get_run_logger

    try:
        logger = get_run_logger()
    except Exception:  # noqa: BLE001 - outside a task run: nowhere to log to
        if level == "warning":
            print(text)
        return
    getattr(logger, level)(text)


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
    resumed_from_epoch: int = 0  # epochs its fine-tuning's checkpoint held (0: from scratch)
    history: list[dict[str, float]] = []  # fine-tuning's per-epoch metrics, for the record


class ResumePoints(EpochObserver):
    """Notes where each member's training resumed: the epochs its checkpoint held (a
    worker lost mid-cell, or an interrupted run rerun)."""

    def __init__(self) -> None:
        self.epochs: dict[int, int] = {}

    def on_resume(self, member: int, epoch: int, history: Any) -> None:
        self.epochs[member] = epoch


@task(name="ablation-pretrain-layer", cache_policy=NO_CACHE, persist_result=False)
@stops_with_the_run
def pretrain_layer(k: int, config: PipelineConfig, lower: list[LayerOutcome], home: str,
                   threads: Optional[int] = None, live: Optional[LiveRun] = None
                   ) -> LayerOutcome:
    """Layer k of a stack through the pipeline's own cached ``pretrain_layer_task``; its
    epochs go to ``live`` as they end."""
    if broken := next((o for o in lower if o.status != "ok"), None):
        return LayerOutcome(status=broken.status, error=broken.error)
    return single_layer(k, config, worker_data(config.data, home, threads), lower, live)


def single_layer(k: int, config: PipelineConfig, data: Any,
                 lower: list[LayerOutcome], live: Optional[LiveRun] = None) -> LayerOutcome:
    """Layer k of one stack through the pipeline's cached ``pretrain_layer_task``."""
    name = f"pretrain-layer-{k + 1}"
    try:
        with watching(watchers(name, f"pretrain/layer_{k + 1}", {0: live})):
            state = pretrain_layer_task.with_options(task_run_name=name)(
                k, config, data, [o.layer for o in lower], return_state=True)
            layer = state.result()
    except DivergenceError as exc:
        return LayerOutcome(status="diverged", error=f"pretraining layer {k + 1}: {exc}")
    return LayerOutcome(status="ok", layer=layer, cached=state.name == "Cached")


@task(name="ablation-cell", cache_policy=NO_CACHE, persist_result=False)
@stops_with_the_run
def run_cell(cell: Cell, stack: list[LayerOutcome], home: str,
             threads: Optional[int] = None, live: Optional[LiveRun] = None) -> CellOutcome:
    """Fine-tune one cell (cached ``finetune_task``) and score it on the test split; its
    epochs go to ``live`` as they end."""
    started = time.perf_counter()
    if broken := next((o for o in stack if o.status != "ok"), None):
        return CellOutcome(status=broken.status, error=broken.error)
    return single_cell(cell, stack, worker_data(cell.config.data, home, threads), started,
                       live)


def single_cell(cell: Cell, stack: list[LayerOutcome], data: Any, started: float,
                live: Optional[LiveRun] = None) -> CellOutcome:
    """One cell through the pipeline's cached ``finetune_task`` (the reconstruct objective:
    ``finetune_autoencoder_task``), scored on the test split; its epochs go to ``live`` as
    they end."""
    from tasks.finetune import finetune_task
    from tasks.reconstruct import finetune_autoencoder_task

    config = cell.config
    encoders = [o.layer for o in stack] if cell.arm == "pretrained" else None
    fine_tune = finetune_autoencoder_task if config.objective == "reconstruct" else finetune_task
    resumed = ResumePoints()
    try:
        with watching(Observers(resumed, watchers(f"finetune-{cell.arm}", "finetune",
                                                  {0: live}))):
            state = fine_tune.with_options(task_run_name=f"finetune-{cell.arm}")(
                cell.arm, config, data, encoders, return_state=True)
            result = state.result()
    except DivergenceError as exc:
        return CellOutcome(status="diverged", error=f"fine-tuning: {exc}")
    return score_cell(config, data, result, stack if encoders else None, started,
                      cached=state.name == "Cached", resumed=resumed.epochs.get(0, 0))


def score_cell(config: PipelineConfig, data: Any, result: Any,
               stack: Optional[list[LayerOutcome]], started: float, cached: bool,
               resumed: int = 0) -> CellOutcome:
    """A fine-tuned cell's outcome: its test error (the classifier's checkpoint, read back
    and verified; for the reconstruct objective the autoencoder's squared error per test
    image) and how training went; ``stack`` is its pretraining (None: random)."""
    from tasks.evaluate import load_classifier, predict
    from runtime.devices import eval_device

    device = eval_device(config.runtime)
    if config.objective == "reconstruct":
        from runtime.checkpoints import load_state
        from tasks.reconstruct_eval import codes_and_outputs, scores

        z = codes_and_outputs(load_state(result.checkpoint), config, data.x_test, device)[1]
        test_error = scores(data.x_test, z, config.autoencoder.loss)[0]
    else:
        model = load_classifier(result.checkpoint, config, data.n_features, data.n_classes)
        y_pred = predict(model, data.x_test, config.runtime.eval_batch_size, device)
        test_error = int((y_pred != data.y_test).sum()) / len(data.y_test)
    return CellOutcome(
        status="ok",
        test_error=test_error,
        val_error=result.best_val_error,
        train_loss=result.history[-1]["train_loss"] if result.history else None,
        epochs_run=result.epochs_run,
        train_seconds=result.train_seconds / result.trained_together,  # the cell's share
        pretrain_seconds=sum(o.layer.train_seconds for o in stack) if stack else None,
        wall_seconds=time.perf_counter() - started,
        cached=cached,
        resumed_from_epoch=resumed,
        history=[{k: float(v) for k, v in row.items()} for row in result.history],
    )
