"""The fine-tuning stage kind: ``ClassifierSystem`` trains P deep classifiers at once, each
member stopping on its own early-stopping rule; ``train_classifier_population`` fits it. A
single run is P = 1; member p of P equals its run at P = 1 up to rounding
(``training.population``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning as L
import torch
from torch.nn import functional as F

from models.classifier import DeepClassifier
from training.classifier_population import ClassifierPopulation
from training.early_stopped_system import EarlyStoppedSystem
from training.engine import PopulationResult, check_seeds, member_generators
from training.observer import EpochObserver
from training.population_eval import classifier_valid
from training.stopping_rules import EarlyStopping, stopping_rule
from training.trainer import finish, fit_system


class ClassifierSystem(EarlyStoppedSystem):
    """Fine-tunes P classifiers on shared data; member p stops on its own ``EarlyStopping``,
    is dropped from the batch, and ends with its best validation weights. Logs per member
    and epoch ``train_loss``, ``train_error``, ``val_loss`` and ``val_error``.
    """

    def __init__(self, classifiers: Sequence[DeepClassifier], x_train: torch.Tensor,
                 y_train: torch.Tensor, x_valid: torch.Tensor, y_valid: torch.Tensor, *,
                 order_seeds: Sequence[int], batch_size: int, optimizer: Mapping[str, Any],
                 stopping: Callable[[int], EarlyStopping],
                 dropout_seeds: Optional[Sequence[int]] = None, eval_batch_size: int = 4096,
                 fused: Optional[bool] = None, stage: str = "finetune population",
                 names: Optional[Sequence[str]] = None):
        P = len(classifiers)
        check_seeds(P, order_seeds=order_seeds, dropout_seeds=dropout_seeds)
        super().__init__(n=len(x_train), order_seeds=order_seeds, batch_size=batch_size,
                         optimizer=optimizer, fused=fused, stage=stage, names=names)
        self.population = ClassifierPopulation(classifiers)
        if self.population.dropout > 0 and dropout_seeds is None:
            raise ValueError("the classifiers use dropout: give dropout_seeds")
        self.x_train, self.y_train = x_train, y_train
        self.x_valid, self.y_valid, self.eval_batch_size = x_valid, y_valid, eval_batch_size
        self.dropout_seeds = list(dropout_seeds or [])
        self.init_stopping(P, stopping, len(x_train), batch_size)

    def make_generators(self) -> None:
        self.dropout = (member_generators(self.dropout_seeds, self.device)
                        if self.population.dropout > 0 else None)

    def generators(self) -> dict[str, list[torch.Generator]]:
        return {"dropout": self.dropout} if self.dropout is not None else {}

    def batch_step(self, idx: torch.Tensor) -> torch.Tensor:
        x, y = self.x_train[idx], self.y_train[idx]  # (Pa, b, D), (Pa, b)
        if self.fused:
            loss, logits = self.population.sgd_step(x, y, self.optimizer_settings["lr"],
                                                    self.dropout)  # (Pa,), (Pa, b, C)
        else:
            logits = self.population(x, self.dropout)  # (Pa, b, C)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                   reduction="none").view(y.shape).mean(dim=1)  # (Pa,)
            self.autograd_step(loss)
        with torch.no_grad():
            error = (logits.argmax(dim=2) != y).to(x.dtype).mean(dim=1)  # (Pa,)
            return torch.stack([loss, error], dim=1) * y.shape[1]  # (Pa, 2)

    def end_epoch(self, means: torch.Tensor) -> None:
        val_loss, val_error = classifier_valid(self.population, self.x_valid, self.y_valid,
                                                self.eval_batch_size)
        self.record([{"train_loss": tl, "train_error": te, "val_loss": vl, "val_error": ve}
                     for (tl, te), vl, ve in zip(means.tolist(), val_loss.tolist(),
                                                 val_error.tolist())])
        self.apply_stopping(val_error.tolist())

    def keep_members(self, keep: Sequence[int]) -> None:
        if self.dropout is not None:  # the stopped members' dropout streams go with them
            self.dropout = [self.dropout[i] for i in keep]
        super().keep_members(keep)


def train_classifier_population(
    classifiers: Sequence[DeepClassifier],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_valid: torch.Tensor,
    y_valid: torch.Tensor,
    *,
    order_seeds: Sequence[int],
    batch_size: int,
    optimizer: Mapping[str, Any],
    stopping: Optional[Callable[[int], EarlyStopping]] = None,
    dropout_seeds: Optional[Sequence[int]] = None,
    eval_batch_size: int = 4096,
    fused: Optional[bool] = None,
    stage: str = "finetune population",
    names: Optional[Sequence[str]] = None,
    trainer: L.Trainer,
    observer: Optional[EpochObserver] = None,
    resume_dir: Optional[Path] = None,
    checkpoint_seconds: Optional[float] = None,
) -> PopulationResult:
    """Fine-tune P classifiers at once, each with its own ``EarlyStopping``.

    Args:
        classifiers: Single modules, one per member (random or pretrained hidden layers).
        x_train, y_train: Shared training data (N, D), (N,) on the training device.
        x_valid, y_valid: Shared validation data.
        order_seeds: Seed of member p's data order (twins share theirs).
        batch_size: Minibatch size.
        optimizer: ``training.optim.build_optimizer`` settings.
        stopping: Member p's rule, from its steps per epoch (``training.stopping_rules``:
            ``stopping_rule``, or ``rule_of`` a fine-tuning config); None: the
            ``tutorial`` rule at its default settings.
        dropout_seeds: Seed of member p's dropout masks; required when the classifiers use
            dropout.
        eval_batch_size: Validation chunk size (the epoch's metrics are their weighted means).
        fused: See ``training.engine.PopulationSystem``.
        stage, names: Name the stage and member p in a divergence error.
        trainer: The stage's trainer (``training.trainer.make_trainer``); its
            ``max_epochs`` is the epoch budget.
        observer: Told every member's metrics as each epoch ends (``training.observer``).
        resume_dir: Where the stage keeps its epoch checkpoint (None: none is kept).
        checkpoint_seconds: Also checkpoint inside an epoch this often (None: at its end).
    """
    stopping = stopping or stopping_rule("tutorial")

    system = ClassifierSystem(classifiers, x_train, y_train, x_valid, y_valid,
                              order_seeds=order_seeds, batch_size=batch_size,
                              optimizer=optimizer, stopping=stopping,
                              dropout_seeds=dropout_seeds, eval_batch_size=eval_batch_size,
                              fused=fused, stage=stage, names=names)
    fit_system(system, trainer, observer, resume_dir, checkpoint_seconds)
    return finish(system, system.result())
