"""LightningModule that fine-tunes the deep classifier with softmax cross-entropy."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch
from torch.nn import functional as F

from models.callbacks import FiniteGuard
from models.classifier import DeepClassifier
from models.optim import ManualSteps, build_optimizer


class LitClassifier(L.LightningModule):
    """Supervised training of every layer of ``classifier``.

    Training batches are chunks, lists of ``(x, y)`` minibatches, one optimiser step each;
    validation batches are ``(x, y)``. Logs ``finetune/<arm>/{train,val}_{loss,error}`` once per epoch;
    ``val_error`` drives early stopping (``models.callbacks.TutorialEarlyStopping``).

    Args:
        classifier: The network; for the pretrained arm its hidden layers are the encoders.
        arm: ``pretrained`` or ``random``, used in metric names.
        optimizer: Optimiser settings (see ``models.optim.build_optimizer``).
    """

    def __init__(self, classifier: DeepClassifier, arm: str, optimizer: Mapping[str, Any]):
        super().__init__()
        # One optimiser step per minibatch of a chunk (models.batches.ChunkedBatches).
        self.automatic_optimization = False
        self.classifier, self.arm, self.optimizer_settings = classifier, arm, optimizer
        self.prefix = f"finetune/{arm}"
        self.finite = FiniteGuard(self.prefix, "Lower finetune.optimizer.lr or add weight decay.")

    def on_fit_start(self) -> None:
        # Lightning keeps a module's mode at fit start; eval mode would disable dropout.
        self.classifier.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)  # (B, D) -> (B, n_classes) logits

    def on_train_start(self) -> None:
        self.steps = ManualSteps(self)

    def on_train_epoch_start(self) -> None:
        # Σ_b metric_b·|b| on the device, logged once per epoch: a self.log call costs far
        # more than a small step (Lightning moves its metric state on every call).
        self._train_sums = torch.zeros(2, device=self.device)
        self._train_count = 0

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str):
        x, y = batch
        logits = self.classifier(x)
        loss = F.cross_entropy(logits, y)  # mean negative log-likelihood
        if stage == "train":
            self.finite.watch(loss, self.current_epoch, self.global_step)
        error = (logits.argmax(dim=1) != y).float().mean()
        return loss, error

    def training_step(self, chunk, batch_idx: int) -> None:
        """One optimiser step per ``(x, y)`` minibatch of the chunk."""
        for batch in chunk:
            loss, error = self._shared_step(batch, "train")
            self.steps.step(loss)  # zero_grad, backward, step; global_step + 1
            n = len(batch[1])
            self._train_sums = self._train_sums + torch.stack([loss.detach(), error]) * n
            self._train_count += n
        self.finite.flush()  # on an accelerator: the chunk's losses, one device wait
        if batch_idx == self.trainer.num_training_batches - 1:  # the epoch's batch-weighted means
            mean_loss, mean_error = self._train_sums / self._train_count
            kwargs = dict(on_step=False, on_epoch=True, batch_size=1)
            self.log(f"{self.prefix}/train_loss", mean_loss, **kwargs)
            self.log(f"{self.prefix}/train_error", mean_error, **kwargs)

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, error = self._shared_step(batch, "val")
        kwargs = dict(on_step=False, on_epoch=True, batch_size=len(batch[1]))
        self.log(f"{self.prefix}/val_loss", loss, **kwargs)
        self.log(f"{self.prefix}/val_error", error, **kwargs)

    def configure_optimizers(self):
        return build_optimizer(self.classifier.parameters(), self.optimizer_settings)
