"""LightningModule that trains one denoising autoencoder on given input codes."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch

from models.callbacks import FiniteGuard
from models.dae import DenoisingAutoencoder
from models.optim import ManualSteps, build_optimizer


class LitDenoisingAutoencoder(L.LightningModule):
    """Trains ``dae`` to reconstruct its clean input from a corrupted copy.

    Training batches are chunks, lists of ``(x,)`` minibatches of clean inputs (the clean
    codes of the layers below), one optimiser step each; validation batches are ``(x,)``.
    Logs ``pretrain/layer_<k>/recon_loss`` (training, on corrupted inputs) and
    ``pretrain/layer_<k>/val_recon_loss`` (validation, clean inputs) once per epoch.

    Args:
        dae: The autoencoder to train; its encoder may be shared with a classifier.
        layer: 1-based index of the layer, used in metric names.
        optimizer: Optimiser settings (see ``models.optim.build_optimizer``).
        seed: Seed of the corruption noise.
    """

    def __init__(
        self, dae: DenoisingAutoencoder, layer: int, optimizer: Mapping[str, Any], seed: int = 0
    ):
        super().__init__()
        # One optimiser step per minibatch of a chunk (models.batches.ChunkedBatches).
        self.automatic_optimization = False
        self.dae, self.layer, self.optimizer_settings, self.seed = dae, layer, optimizer, seed
        self.prefix = f"pretrain/layer_{layer}"
        self.noise_generator: torch.Generator | None = None
        self.finite = FiniteGuard(self.prefix, "Lower pretrain.optimizer.lr or check the "
                                               "input normalisation.")

    def on_fit_start(self) -> None:
        # The noise source lives on the training device so no mask is copied host->device.
        self.noise_generator = torch.Generator(device=self.device).manual_seed(self.seed)
        # Lightning keeps a module's mode at fit start; a dA handed over in eval mode would
        # silently train without corruption.
        self.dae.train()

    def on_train_start(self) -> None:
        self.steps = ManualSteps(self)

    def on_train_epoch_start(self) -> None:
        # Σ_b loss_b·|b| on the device, logged once per epoch: a self.log call costs far
        # more than a small step (Lightning moves its metric state on every call).
        self._train_sum = torch.zeros((), device=self.device)
        self._train_count = 0

    def _shared_step(self, batch: tuple[torch.Tensor], stage: str) -> torch.Tensor:
        (x,) = batch  # (B, n_visible), clean
        if stage == "train":
            loss = self.dae(x, generator=self.noise_generator)  # corrupt -> encode -> decode
            self.finite.watch(loss, self.current_epoch, self.global_step)
        else:
            loss = self.dae(x)  # eval mode: no corruption
            self.log(f"{self.prefix}/{stage}_recon_loss", loss, on_step=False, on_epoch=True,
                     batch_size=len(x))
        return loss

    def training_step(self, chunk: list[tuple[torch.Tensor]], batch_idx: int) -> None:
        """One SGD step per minibatch of the chunk: corrupt, reconstruct, step."""
        for batch in chunk:
            loss = self._shared_step(batch, "train")
            self.steps.step(loss)  # zero_grad, backward, step; global_step + 1
            self._train_sum = self._train_sum + loss.detach() * len(batch[0])
            self._train_count += len(batch[0])
        self.finite.flush()  # on an accelerator: the chunk's losses, one device wait
        if batch_idx == self.trainer.num_training_batches - 1:  # the epoch's batch-weighted mean
            self.log(f"{self.prefix}/recon_loss", self._train_sum / self._train_count,
                     on_step=False, on_epoch=True, batch_size=1)

    def validation_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def configure_optimizers(self):
        return build_optimizer(self.dae.parameters(), self.optimizer_settings)
