"""Callbacks shared by the training systems: per-epoch history, divergence checks, and the
tutorial's early-stopping rule with the best weights restored."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch


class EpochHistory(L.Callback):
    """Records every epoch's aggregated metrics under ``prefix`` as plain floats.

    Metrics are aggregated on the device by ``self.log(on_epoch=True)`` and read once per
    epoch here, so the training step never forces a host sync for logging.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        row: dict[str, float] = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for key, value in trainer.callback_metrics.items():
            if key.startswith(self.prefix + "/"):
                row[key[len(self.prefix) + 1 :]] = float(value)
        self.rows.append(row)


class TutorialEarlyStopping(L.Callback):
    """Early stopping on a validation error, keeping and restoring the best weights.

    Rules:
        ``tutorial`` (DeepLearningTutorials ``SdA.py``): patience starts at
            ``patience_batches × batches_per_epoch`` steps; a validation error below
            ``best × improvement_threshold`` raises it to ``max(patience, step ×
            patience_increase)``; training stops once ``step >= patience``. The rule is
            evaluated at each validation (every epoch, as in the tutorial, whose validation
            frequency is one epoch), so a run may end up to one epoch later than the
            tutorial's mid-epoch stop; the restored best weights are the same.
        ``patience``: stop after ``patience_epochs`` epochs without an improvement below
            ``best × improvement_threshold``.
        ``none``: never stop early; still restore the best weights.
    """

    def __init__(
        self,
        monitor: str,
        rule: str = "tutorial",
        patience_batches: int = 10,
        patience_increase: float = 2.0,
        improvement_threshold: float = 0.995,
        patience_epochs: int = 10,
    ):
        if rule not in ("tutorial", "patience", "none"):
            raise ValueError(f"unknown early-stopping rule {rule!r}")
        self.monitor, self.rule = monitor, rule
        self.patience_batches, self.patience_increase = patience_batches, patience_increase
        self.threshold, self.patience_epochs = improvement_threshold, patience_epochs
        self.best = math.inf
        self.best_epoch = -1
        self.best_state: Optional[dict[str, torch.Tensor]] = None
        self.patience_steps = 0
        self._stale_epochs = 0
        self.stopped_early = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Known once the train dataloader is set up. Minibatches, not Lightning batches: a
        # ``ChunkedBatches`` item holds several optimiser steps.
        loader = getattr(trainer, "train_dataloader", None)
        steps = getattr(loader, "steps_per_epoch", None) or trainer.num_training_batches
        self.patience_steps = self.patience_batches * int(steps)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(f"early stopping monitors {self.monitor!r}, which was not logged")
        value, step = float(trainer.callback_metrics[self.monitor]), trainer.global_step
        significant = value < self.best * self.threshold
        if significant:
            self.patience_steps = max(self.patience_steps, int(step * self.patience_increase))
            self._stale_epochs = 0
        else:
            self._stale_epochs += 1
        if value < self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            self.best_state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        stop = (self.rule == "tutorial" and step >= self.patience_steps) or (
            self.rule == "patience" and self._stale_epochs >= self.patience_epochs
        )
        if stop:
            self.stopped_early = True
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # load_state_dict copies into the existing parameters: shared encoders stay shared.
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)

    def summary(self) -> dict[str, Any]:
        return {
            "best_val_error": self.best,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped_early,
        }


def check_finite(loss: torch.Tensor, stage: str, epoch: int, step: int, hint: str) -> None:
    """Raise ``FloatingPointError`` naming stage, epoch and step when the loss is NaN/inf."""
    if not bool(torch.isfinite(loss)):
        raise FloatingPointError(
            f"{stage}: loss became {float(loss.detach())} at epoch {epoch}, step {step}. {hint}"
        )


class FiniteGuard:
    """Watches a stage's training losses for NaN/inf and names the first bad step.

    ``bool(torch.isfinite(loss))`` waits for the device: on a CPU that costs nothing, so
    every loss is checked at its own step; on an accelerator it would stall the host at
    every step, which then can no longer queue the next kernels while the device works.
    There the losses of a chunk (``models.batches.ChunkedBatches``, ≈ 1,024 examples) are
    checked together in ``flush``, with one wait, and the error still names the exact
    epoch and step of the first non-finite loss; the steps after it in that chunk only
    train weights the failed stage then throws away.

    Args:
        stage: Metric prefix named in the error, e.g. ``pretrain/layer_2``.
        hint: What to change, appended to the error.
        every_step: Check each loss at once (None: only on a CPU).
    """

    def __init__(self, stage: str, hint: str, every_step: Optional[bool] = None):
        self.stage, self.hint, self.every_step = stage, hint, every_step
        self._pending: list[tuple[torch.Tensor, int, int]] = []

    def watch(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        """Check ``loss`` now (CPU) or at the next ``flush`` (accelerator)."""
        every_step = loss.device.type == "cpu" if self.every_step is None else self.every_step
        if every_step:
            check_finite(loss, self.stage, epoch, step, self.hint)
        else:
            self._pending.append((loss.detach(), epoch, step))

    def flush(self) -> None:
        """Check the losses watched since the last flush: one device wait for all of them."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        finite = torch.isfinite(torch.stack([loss for loss, _, _ in pending]))
        if bool(finite.all()):
            return
        loss, epoch, step = pending[int((~finite).nonzero()[0])]
        check_finite(loss, self.stage, epoch, step, self.hint)
