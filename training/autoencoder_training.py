"""The engine's third stage kind: ``AutoencoderSystem`` fine-tunes P deep autoencoders
(``models.autoencoder``) on reconstruction, each member with its own early stopping on the
validation squared error per image; ``train_autoencoder_population`` fits it.

The pretrained and the random-init autoencoders of one seed are a population of two: they
read the same data order (``order_seeds`` equal), for the same budget and stopping rule.
The steps go through autograd and ``torch.optim`` (no hand-fused step for this kind: the
matrix products are most of a step, and ``runtime.fused_update`` makes Adam's update one
kernel, docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning as L
import torch

from models.autoencoder import AutoencoderPopulation, squared_error
from training.early_stopped_system import EarlyStoppedSystem
from training.engine import PopulationResult, check_seeds
from training.observer import EpochObserver
from training.population_eval import _sub_chunks
from training.stopping_rules import EarlyStopping, stopping_rule
from training.trainer import finish, fit_system


@torch.no_grad()
def autoencoder_valid(pop: AutoencoderPopulation, x: torch.Tensor,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and squared error per image of every member (P,), on clean inputs x (N, D),
    batch-weighted means over chunks of ``chunk`` examples."""
    was_training = pop.training
    pop.eval()
    width = max(w.shape[-1] for w in pop.enc_w)
    loss_sum = torch.zeros(pop.P, dtype=x.dtype, device=x.device)
    sq_sum = torch.zeros_like(loss_sum)
    for start in range(0, len(x), chunk):
        for s, e in _sub_chunks(start, min(start + chunk, len(x)), pop.P, width):
            a = pop.decoder_logits(pop.encode(x[s:e]))  # (P, rows, D)
            loss_sum += pop.reconstruction_loss(x[s:e], a) * (e - s)
            sq_sum += squared_error(x[s:e], pop.output(a)) * (e - s)
    pop.train(was_training)
    return loss_sum / len(x), sq_sum / len(x)


class AutoencoderSystem(EarlyStoppedSystem):
    """Fine-tunes P autoencoders on shared inputs; member p stops on its own
    ``EarlyStopping`` over ``val_sq_error_per_image``, is dropped from the batch and ends
    with its best validation weights. Logs per member and epoch ``train_loss``,
    ``train_sq_error_per_image``, ``val_loss`` and ``val_sq_error_per_image``.
    """

    def __init__(self, population: AutoencoderPopulation, x_train: torch.Tensor,
                 x_valid: torch.Tensor, *, order_seeds: Sequence[int], batch_size: int,
                 optimizer: Mapping[str, Any], stopping: Callable[[int], EarlyStopping],
                 eval_batch_size: int = 4096, stage: str = "autoencoder population",
                 names: Optional[Sequence[str]] = None):
        check_seeds(population.P, order_seeds=order_seeds)
        super().__init__(n=len(x_train), order_seeds=order_seeds, batch_size=batch_size,
                         optimizer=optimizer, fused=False, stage=stage, names=names)
        self.population = population
        self.x_train, self.x_valid, self.eval_batch_size = x_train, x_valid, eval_batch_size
        self.init_stopping(population.P, stopping, len(x_train), batch_size)

    def batch_step(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.x_train[idx]  # (Pa, b, D)
        a = self.population.decoder_logits(self.population.encode(x))  # (Pa, b, D)
        loss = self.population.reconstruction_loss(x, a)  # (Pa,)
        self.autograd_step(loss)
        with torch.no_grad():
            error = squared_error(x, self.population.output(a))  # (Pa,)
            return torch.stack([loss.detach(), error], dim=1) * idx.shape[1]  # (Pa, 2)

    def end_epoch(self, means: torch.Tensor) -> None:
        val_loss, val_sq = autoencoder_valid(self.population, self.x_valid, self.eval_batch_size)
        self.record([{"train_loss": tl, "train_sq_error_per_image": te, "val_loss": vl,
                      "val_sq_error_per_image": ve}
                     for (tl, te), vl, ve in zip(means.tolist(), val_loss.tolist(),
                                                 val_sq.tolist())])
        self.apply_stopping(val_sq.tolist())


def train_autoencoder_population(
    population: AutoencoderPopulation,
    x_train: torch.Tensor,
    x_valid: torch.Tensor,
    *,
    order_seeds: Sequence[int],
    batch_size: int,
    optimizer: Mapping[str, Any],
    stopping: Optional[Callable[[int], EarlyStopping]] = None,
    eval_batch_size: int = 4096,
    stage: str = "autoencoder population",
    names: Optional[Sequence[str]] = None,
    trainer: L.Trainer,
    observer: Optional[EpochObserver] = None,
    resume_dir: Optional[Path] = None,
    checkpoint_seconds: Optional[float] = None,
) -> PopulationResult:
    """Fine-tune P autoencoders at once, each with its own ``EarlyStopping``.

    Args:
        population: The members (pretrained or random), on the training device.
        x_train, x_valid: Shared inputs (N, D) in [0,1], on the training device.
        order_seeds: Seed of member p's data order (the two arms of a seed share theirs).
        batch_size: Minibatch size.
        optimizer: ``training.optim.build_optimizer`` settings.
        stopping: Member p's rule, from its steps per epoch (``training.stopping_rules``:
            ``stopping_rule``, or ``rule_of`` a fine-tuning config), applied to the validation
            squared error per image; None: the ``patience`` rule at its default settings.
        eval_batch_size: Validation chunk size.
        stage, names: Name the stage and member p in a divergence error.
        trainer: The stage's trainer (``training.trainer.make_trainer``); its
            ``max_epochs`` is the epoch budget.
        observer: Told every member's metrics as each epoch ends (``training.observer``).
        resume_dir: Where the stage keeps its epoch checkpoint (None: none is kept).
        checkpoint_seconds: Also checkpoint inside an epoch this often (None: at its end).
    """
    stopping = stopping or stopping_rule("patience")

    system = AutoencoderSystem(population, x_train, x_valid, order_seeds=order_seeds,
                               batch_size=batch_size, optimizer=optimizer, stopping=stopping,
                               eval_batch_size=eval_batch_size, stage=stage, names=names)
    fit_system(system, trainer, observer, resume_dir, checkpoint_seconds)
    return finish(system, system.result())
