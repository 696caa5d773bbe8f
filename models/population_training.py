"""The engine's two stage kinds (``models.engine``): ``DAESystem`` pretrains P denoising
autoencoders, ``ClassifierSystem`` fine-tunes P classifiers with per-member early stopping;
``train_dae_population`` and ``train_classifier_population`` fit them. A single run is
P = 1; member p of P equals its run at P = 1 up to rounding (``models.population``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch.nn import functional as F

from models.classifier import DeepClassifier
from models.classifier_population import ClassifierPopulation
from models.dae import DenoisingAutoencoder
from models.early_stopping import EarlyStopping
from models.early_stopped import EarlyStoppedSystem, PopulationResult, stopping_rule, _cpu_state
from models.engine import PopulationSystem, make_trainer
from models.epoch_checkpoint import EpochCheckpoint
from models.observer import EpochObserver
from models.population import DAEPopulation, _gather
from models.population_eval import classifier_valid, dae_valid_loss

#: ``fit(trainer, system)``: how a stage runs Lightning (``runtime.environment.fit`` adds the
#: interrupt handling of the CLI); the default is ``trainer.fit(system)``.
Fit = Callable[[Any, Any], None]


def _generators(seeds: Optional[Sequence[int]], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds or []]


def _check_seeds(P: int, **seeds: Optional[Sequence[int]]) -> None:
    for name, values in seeds.items():
        if values is not None and len(values) != P:
            raise ValueError(f"{name} has {len(values)} seeds for {P} members")


def _fit(system: PopulationSystem, max_epochs: int, device: torch.device,
         trainer: Optional[Any], fit: Optional[Fit],
         observer: Optional[EpochObserver] = None, resume_dir: Optional[Path] = None,
         checkpoint_seconds: Optional[float] = None) -> None:
    """Fit ``system`` for ``max_epochs``; with ``resume_dir``, from the epoch checkpoint
    there (``models.epoch_checkpoint``) when one is left, writing one every epoch (and
    inside an epoch every ``checkpoint_seconds``), removed once the stage has its result."""
    if trainer is None:
        trainer = make_trainer(max_epochs, accelerator="gpu" if device.type == "cuda" else "cpu")
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
    (fit or (lambda t, s: t.fit(s)))(trainer, system)


def _finish(system: PopulationSystem, result: PopulationResult) -> PopulationResult:
    """The stage has its result: its epoch checkpoint goes."""
    if system.checkpoint is not None:
        system.checkpoint.remove()
    return result


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
        _check_seeds(len(daes), noise_seeds=noise_seeds, order_seeds=order_seeds)
        super().__init__(n=x_train.shape[-2], order_seeds=order_seeds, batch_size=batch_size,
                         optimizer=optimizer, fused=fused, stage=stage, names=names)
        self.population = DAEPopulation(daes)
        self.x_train, self.x_valid, self.eval_batch_size = x_train, x_valid, eval_batch_size
        self.noise_seeds = list(noise_seeds)

    def make_generators(self) -> None:
        # The noise source lives on the training device so no mask is copied host->device.
        self.noise = _generators(self.noise_seeds, self.device)

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
        states = [_cpu_state(self.population, p) for p in range(self.population.P)]
        return PopulationResult(states=states, histories=self.histories, seconds=self.seconds)


def train_dae_population(
    daes: Sequence[DenoisingAutoencoder],
    x_train: torch.Tensor,
    x_valid: Optional[torch.Tensor],
    *,
    noise_seeds: Sequence[int],
    order_seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    optimizer: Mapping[str, Any],
    eval_batch_size: int = 4096,
    fused: Optional[bool] = None,
    stage: str = "pretrain population",
    names: Optional[Sequence[str]] = None,
    trainer: Optional[Any] = None,
    fit: Optional[Fit] = None,
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
        epochs: Epochs (no early stopping in pretraining).
        batch_size: Minibatch size.
        optimizer: ``models.optim.build_optimizer`` settings.
        eval_batch_size: Validation chunk size (the epoch's loss is their weighted mean).
        fused: See ``models.engine.PopulationSystem``.
        stage, names: Name the stage and member p in a divergence error.
        trainer: A Lightning trainer of ``epochs`` epochs (None: ``make_trainer``'s).
        fit: How to run it (None: ``trainer.fit``).
        observer: Told every member's metrics as each epoch ends (``models.observer``).
        resume_dir: Where the stage keeps its epoch checkpoint (None: none is kept).
        checkpoint_seconds: Also checkpoint inside an epoch this often (None: at its end).
    """
    system = DAESystem(daes, x_train, x_valid, noise_seeds=noise_seeds,
                       order_seeds=order_seeds, batch_size=batch_size, optimizer=optimizer,
                       eval_batch_size=eval_batch_size, fused=fused, stage=stage,
                       names=names)
    _fit(system, epochs, x_train.device, trainer, fit, observer, resume_dir,
         checkpoint_seconds)
    return _finish(system, system.result())


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
        _check_seeds(P, order_seeds=order_seeds, dropout_seeds=dropout_seeds)
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
        self.dropout = (_generators(self.dropout_seeds, self.device)
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
    max_epochs: int,
    batch_size: int,
    optimizer: Mapping[str, Any],
    early_stopping: str = "tutorial",
    patience_batches: int = 10,
    patience_increase: float = 2.0,
    improvement_threshold: float = 0.995,
    patience_epochs: int = 10,
    dropout_seeds: Optional[Sequence[int]] = None,
    eval_batch_size: int = 4096,
    fused: Optional[bool] = None,
    stage: str = "finetune population",
    names: Optional[Sequence[str]] = None,
    trainer: Optional[Any] = None,
    fit: Optional[Fit] = None,
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
        max_epochs: Epoch budget.
        batch_size: Minibatch size.
        optimizer: ``models.optim.build_optimizer`` settings.
        early_stopping, patience_batches, patience_increase, improvement_threshold,
            patience_epochs: The rule and its settings (``models.early_stopping``).
        dropout_seeds: Seed of member p's dropout masks; required when the classifiers use
            dropout.
        eval_batch_size: Validation chunk size (the epoch's metrics are their weighted means).
        fused: See ``models.engine.PopulationSystem``.
        stage, names: Name the stage and member p in a divergence error.
        trainer: A Lightning trainer of ``max_epochs`` epochs (None: ``make_trainer``'s).
        fit: How to run it (None: ``trainer.fit``).
        observer: Told every member's metrics as each epoch ends (``models.observer``).
        resume_dir: Where the stage keeps its epoch checkpoint (None: none is kept).
        checkpoint_seconds: Also checkpoint inside an epoch this often (None: at its end).
    """
    stopping = stopping_rule(early_stopping, patience_batches=patience_batches,
                             patience_increase=patience_increase,
                             improvement_threshold=improvement_threshold,
                             patience_epochs=patience_epochs)

    system = ClassifierSystem(classifiers, x_train, y_train, x_valid, y_valid,
                              order_seeds=order_seeds, batch_size=batch_size,
                              optimizer=optimizer, stopping=stopping,
                              dropout_seeds=dropout_seeds, eval_batch_size=eval_batch_size,
                              fused=fused, stage=stage, names=names)
    _fit(system, max_epochs, x_train.device, trainer, fit, observer, resume_dir,
         checkpoint_seconds)
    return _finish(system, system.result())
