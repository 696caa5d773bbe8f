"""The pretraining stage kind: ``DAESystem`` trains P denoising autoencoders at once on
their clean inputs, each corrupted by its member's own noise; ``train_dae_population`` fits
it. A single run is P = 1; member p of P equals its run at P = 1 up to rounding
(``training.population``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import torch

from models.dae import DenoisingAutoencoder
from training.engine import (PopulationResult, PopulationSystem, check_seeds, cpu_state,
                             member_generators)
from training.observer import EpochObserver
from training.population import DAEPopulation, _gather
from training.population_eval import dae_valid_loss
from training.trainer import finish, fit_system


class DAESystem(PopulationSystem):
    """Pretrains P autoencoders on clean inputs x_train, shared (N, D) or per member
    (P, N, D) (deeper layers: each member's own codes); member p draws its corruption from
    ``noise_seeds[p]``. Logs per member and epoch ``recon_loss`` (training, corrupted inputs)
    and ``val_recon_loss`` (clean validation inputs, when given).
    """

    def __init__(self, daes: Sequence[DenoisingAutoencoder], x_train: torch.Tensor,
                 x_valid: Optional[torch.Tensor], *, noise_seeds: Sequence[int],
                 order_seeds: Sequence[int], batch_size: int, optimizer: Mapping[str, Any],
                 eval_batch_size: int = 4096, fused: Optional[bool] = None,
                 stage: str = "pretrain population", names: Optional[Sequence[str]] = None):
        check_seeds(len(daes), noise_seeds=noise_seeds, order_seeds=order_seeds)
        super().__init__(n=x_train.shape[-2], order_seeds=order_seeds, batch_size=batch_size,
                         optimizer=optimizer, fused=fused, stage=stage, names=names)
        self.population = DAEPopulation(daes)
        self.x_train, self.x_valid, self.eval_batch_size = x_train, x_valid, eval_batch_size
        self.noise_seeds = list(noise_seeds)

    def make_generators(self) -> None:
        # The noise source lives on the training device so no mask is copied host->device.
        self.noise = member_generators(self.noise_seeds, self.device)

    def generators(self) -> dict[str, list[torch.Generator]]:
        return {"noise": self.noise}

    def batch_step(self, idx: torch.Tensor) -> torch.Tensor:
        x = _gather(self.x_train, idx)  # (P, b, D), clean
        if self.fused:
            loss = self.population.sgd_step(x, self.noise, self.optimizer_settings["lr"])
        else:
            loss = self.population(x, self.noise)  # (P,) each member's mean loss
            self.autograd_step(loss)
        return loss.detach().unsqueeze(1) * idx.shape[1]  # (P, 1)

    def end_epoch(self, means: torch.Tensor) -> None:
        rows = [{"recon_loss": v} for v in means[:, 0].tolist()]
        if self.x_valid is not None:
            valid = dae_valid_loss(self.population, self.x_valid, self.eval_batch_size)
            for row, v in zip(rows, valid.tolist()):
                row["val_recon_loss"] = v
        self.record(rows)

    def result(self) -> PopulationResult:
        states = [cpu_state(self.population, p) for p in range(self.population.P)]
        return PopulationResult(states=states, histories=self.histories, seconds=self.seconds)


def train_dae_population(
    daes: Sequence[DenoisingAutoencoder],
    x_train: torch.Tensor,
    x_valid: Optional[torch.Tensor],
    *,
    noise_seeds: Sequence[int],
    order_seeds: Sequence[int],
    batch_size: int,
    optimizer: Mapping[str, Any],
    eval_batch_size: int = 4096,
    fused: Optional[bool] = None,
    stage: str = "pretrain population",
    names: Optional[Sequence[str]] = None,
    trainer: L.Trainer,
    observer: Optional[EpochObserver] = None,
    resume_dir: Optional[Path] = None,
    checkpoint_seconds: Optional[float] = None,
) -> PopulationResult:
    """Pretrain P autoencoders at once, one ``DAESystem``.

    Args:
        daes: Single modules, one per member, already initialised from their seeds.
        x_train: Clean inputs, shared (N, D) or per member (P, N, D), on the training device.
        x_valid: Clean validation inputs, same layout, or None.
        noise_seeds: Seed of member p's corruption generator.
        order_seeds: Seed of member p's data order.
        batch_size: Minibatch size.
        optimizer: ``training.optim.build_optimizer`` settings.
        eval_batch_size: Validation chunk size (the epoch's loss is their weighted mean).
        fused: See ``training.engine.PopulationSystem``.
        stage, names: Name the stage and member p in a divergence error.
        trainer: The stage's trainer (``training.trainer.make_trainer``); its
            ``max_epochs`` is the number of epochs (no early stopping in pretraining).
        observer: Told every member's metrics as each epoch ends (``training.observer``).
        resume_dir: Where the stage keeps its epoch checkpoint (None: none is kept).
        checkpoint_seconds: Also checkpoint inside an epoch this often (None: at its end).
    """
    system = DAESystem(daes, x_train, x_valid, noise_seeds=noise_seeds,
                       order_seeds=order_seeds, batch_size=batch_size, optimizer=optimizer,
                       eval_batch_size=eval_batch_size, fused=fused, stage=stage,
                       names=names)
    fit_system(system, trainer, observer, resume_dir, checkpoint_seconds)
    return finish(system, system.result())
