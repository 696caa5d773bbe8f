"""The Lightning trainer of every stage, and how a stage's system is fitted with it.

``make_trainer`` is the one factory: the accelerator, precision and determinism of the
runtime settings, a progress bar in a terminal, Lightning's INFO lines only with
``--verbose``, and the callback that re-raises an interrupt Python swallowed
(``runtime.interrupts``). ``fit`` runs it so that Ctrl-C arrives as ``KeyboardInterrupt``;
``fit_system`` adds the stage's epoch checkpoint (``training.epoch_checkpoint``), from which
a rerun continues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L

from runtime.console import verbose
from runtime.devices import RuntimeSettings, precision_used, progress_bar_enabled
from runtime.interrupts import raise_pending_interrupt
from training.engine import PopulationResult, PopulationSystem
from training.epoch_checkpoint import EpochCheckpoint
from training.observer import EpochObserver


class RaisePendingInterrupt(L.Callback):
    """Re-raises an interrupt that was swallowed, once per training or validation batch
    (a chunk of minibatches: about 1,000 examples)."""

    on_train_batch_end = staticmethod(raise_pending_interrupt)
    on_validation_batch_end = staticmethod(raise_pending_interrupt)


def make_trainer(runtime: RuntimeSettings, max_epochs: int,
                 callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
    """The trainer of one stage: one device, no logger or checkpoints of its own (the stage
    records its history and writes safetensors), no validation loop (the systems validate
    every member at the end of each epoch).

    Args:
        runtime: The runtime settings (``accelerator``, ``precision`` with ``auto``
            resolved by ``runtime.devices.precision_used``, ``deterministic``).
        max_epochs: The stage's epoch budget.
        callbacks: Extra callbacks, before the one that re-raises a swallowed interrupt.
    """
    import logging
    import warnings

    # Lightning's INFO lines (device summary, tips, "fit stopped") only with --verbose. Its
    # rank-zero logger is ``pytorch_lightning``'s once MLflow has imported that package,
    # ``lightning.pytorch``'s before.
    quiet = not verbose()
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    # Lightning 2.6 + torch 2.14: a deprecation inside Lightning's own pytree helper.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")
    warnings.filterwarnings("ignore", message=".*configure_optimizers.*returned `None`")
    return L.Trainer(
        accelerator=runtime.accelerator, devices=1, precision=precision_used(runtime),
        deterministic=runtime.deterministic, max_epochs=max_epochs, logger=False,
        enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress_bar_enabled(), num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[*callbacks, RaisePendingInterrupt()],
    )


def fit(trainer: L.Trainer, system: Any, datamodule: Any = None) -> None:
    """``trainer.fit`` that lets Ctrl-C propagate as ``KeyboardInterrupt``.

    Lightning catches ``KeyboardInterrupt``, ignores further SIGINTs and calls
    ``sys.exit(1)``; the pipeline needs the interrupt itself (to mark its MLflow runs KILLED
    and exit 130), and SIGINT handling restored for the stages that follow.
    """
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        trainer.fit(system, datamodule=datamodule)
    except SystemExit as exc:
        if trainer.interrupted:
            raise KeyboardInterrupt("training interrupted") from exc
        raise
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)


def fit_system(system: PopulationSystem, trainer: L.Trainer,
               observer: Optional[EpochObserver] = None, resume_dir: Optional[Path] = None,
               checkpoint_seconds: Optional[float] = None) -> None:
    """Fit ``system`` for the trainer's ``max_epochs``; with ``resume_dir``, from the epoch
    checkpoint there when one is left, writing one every epoch (and inside an epoch every
    ``checkpoint_seconds``), removed by ``finish`` once the stage has its result."""
    max_epochs = trainer.max_epochs
    if observer is not None:
        system.observer = observer
    system.max_epochs, system.checkpoint_seconds = max_epochs, checkpoint_seconds
    if resume_dir is not None:
        system.checkpoint = EpochCheckpoint(resume_dir, {
            "stage": system.stage, "names": system.names, "order_seeds": system.order_seeds,
            "n": system.n, "batch_size": system.batch_size, "fused": system.fused,
            "optimizer": system.optimizer_settings, "max_epochs": max_epochs})
        system.restored = system.checkpoint.load()
        for text in system.checkpoint.notes:
            system.observer.on_note(text)
        if system.restored is not None:
            meta = system.restored[1]
            system.start_epoch = meta["epoch"]
            # Lightning counts this fit's epochs from 0: give it the ones left
            trainer.fit_loop.max_epochs = max_epochs - meta["epoch"] if meta["members"] else 0
    fit(trainer, system)


def finish(system: PopulationSystem, result: PopulationResult) -> PopulationResult:
    """The stage has its result: its epoch checkpoint goes."""
    if system.checkpoint is not None:
        system.checkpoint.remove()
    return result
