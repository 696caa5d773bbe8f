"""The training engine: one LightningModule per stage kind trains a population of P >= 1
members (``training.population``) that differ only in their seeds; a single run is P = 1.

Lightning runs the epochs, places the population on the device, shows progress and stops
on request; the module takes the optimiser steps itself (``automatic_optimization`` off):
with plain SGD the population's fused ``sgd_step`` (no autograd, no ``torch.optim``),
otherwise autograd on the sum of the members' losses and one optimiser over the stacked
parameters. Each Lightning batch is a *chunk* of minibatches (``EpochChunks``), so that
Lightning's per-batch machinery runs once per ≈ 1,024 examples, not once per step.

``PopulationSystem`` here is what every stage kind shares; ``DAESystem``
(``training.dae_training``), ``ClassifierSystem`` (``training.classifier_training``) and
``AutoencoderSystem`` (``training.autoencoder_training``) add what each kind measures per
epoch and how it stops, and hand back a ``PopulationResult``. ``training.trainer`` fits them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import lightning as L
import torch

from training.batches import EpochChunks
from training.epoch_checkpoint import (EpochCheckpoint, TrainingState, generator_states,
                                       load_optimizer_state, optimizer_state, prefixed, under)
from training.observer import EpochObserver
from training.optim import build_optimizer
from training.population import History, plain_sgd, wide


@dataclass
class PopulationResult:
    """Per-member outcome of a population run, in the single-model formats.

    Attributes:
        states: Member p's final weights as a ``DenoisingAutoencoder`` / ``DeepClassifier``
            state dict on the CPU (the best validation weights for early-stopped kinds).
        histories: Member p's per-epoch rows: ``epoch``, ``step`` and the system's metrics.
        best_val_error, best_epoch, stopped_early: ``EarlyStopping.summary()`` per member
            (early-stopped kinds only).
        seconds: Wall time of the training loop.
    """

    states: list[dict[str, torch.Tensor]]
    histories: list[History]
    best_val_error: list[float] = field(default_factory=list)
    best_epoch: list[int] = field(default_factory=list)
    stopped_early: list[bool] = field(default_factory=list)
    seconds: float = 0.0


def cpu_state(pop: Any, i: int) -> dict[str, torch.Tensor]:
    """Row ``i`` of a population as its member's state dict, on the CPU."""
    return {k: v.cpu() for k, v in pop.member_state(i).items()}


def check_seeds(P: int, **seeds: Optional[Sequence[int]]) -> None:
    """Refuse a list of seeds that does not give one per member."""
    for name, values in seeds.items():
        if values is not None and len(values) != P:
            raise ValueError(f"{name} has {len(values)} seeds for {P} members")


def member_generators(seeds: Optional[Sequence[int]], device: torch.device
                      ) -> list[torch.Generator]:
    """One random-number generator per member on ``device``, seeded from ``seeds``."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds or []]


class PopulationSystem(L.LightningModule):
    """What both stage kinds share: the chunked data order, the optimiser steps, the step
    count, the per-member history and the divergence check.

    Subclasses set ``self.population`` and implement ``batch_step(idx)`` (one optimiser
    step of every member on its rows ``idx``, (P, b); returns the per-member sums of the
    epoch's metrics, (P, k), loss first) and ``end_epoch(means)`` (those sums over the
    epoch divided by the number of examples: record, validate, stop).

    Args:
        n: Training examples.
        order_seeds: Seed of member p's data order.
        batch_size: Minibatch size.
        optimizer: ``training.optim.build_optimizer`` settings.
        fused: Use the population's ``sgd_step`` (plain SGD only) instead of autograd and
            ``torch.optim``; None: whenever the optimiser is plain SGD.
        stage: Names the stage in errors, e.g. ``pretrain layer 2``.
        names: Names member p in errors (None: ``member p``).
    """

    def __init__(self, *, n: int, order_seeds: Sequence[int], batch_size: int,
                 optimizer: Mapping[str, Any], fused: Optional[bool], stage: str,
                 names: Optional[Sequence[str]] = None):
        super().__init__()
        self.automatic_optimization = False  # the steps are taken here, one per minibatch
        self.n, self.batch_size, self.stage = n, batch_size, stage
        self.order_seeds = [int(s) for s in order_seeds]
        self.optimizer_settings = dict(optimizer)
        self.fused = use_fused(fused, optimizer)
        self.members = list(range(len(order_seeds)))  # original index of each row
        self.names = list(names) if names else [f"member {p}" for p in self.members]
        self.histories: list[History] = [[] for _ in order_seeds]
        self.steps, self.seconds = 0, 0.0
        self.opt: Optional[torch.optim.Optimizer] = None
        self._sums: Optional[torch.Tensor] = None
        #: Told each member's metrics as every epoch ends (``training.observer``).
        self.observer: EpochObserver = EpochObserver()
        self._ended: list[tuple[int, dict[str, float]]] = []  # this epoch's rows, to report
        #: Written at the end of every epoch when set; ``restored`` is what to continue from.
        self.checkpoint: Optional[EpochCheckpoint] = None
        self.restored: Optional[TrainingState] = None
        self.start_epoch, self.max_epochs = 0, 0  # a resumed fit starts at ``start_epoch``
        #: Also checkpoint inside an epoch once this many seconds passed since the last one.
        self.checkpoint_seconds: Optional[float] = None

    @property
    def epoch(self) -> int:
        """The stage's epoch (0-based), counting the epochs done before a resume."""
        return self.start_epoch + self.current_epoch

    def train_dataloader(self) -> EpochChunks:
        self.chunks = EpochChunks(self, self.n, self.batch_size)
        self.chunks.epoch = self.start_epoch
        if self.restored is not None:
            self.chunks.skip = self.restored[1].get("position", 0)
        return self.chunks

    def configure_optimizers(self) -> None:
        return None  # the system owns its optimiser: members dropped mid-run reshape it

    def on_fit_start(self) -> None:
        # Lightning keeps a module's mode at fit start; eval mode would skip noise/dropout.
        self.population.train()
        self.make_generators()
        if self.restored is not None:
            self.load_training_state(*self.restored)
        if not self.fused:
            self.opt = build_optimizer(self.population.parameters(), self.optimizer_settings)
            if self.restored is not None:
                load_optimizer_state(self.opt, under("opt", self.restored[0]),
                                     self.restored[1]["optimizer"])
        if self.restored is not None:
            self._sums = self.restored[0].get("sums")  # the partial epoch's, if any
            if self._sums is not None:
                self._sums = self._sums.to(self.device)
            for m in range(len(self.histories)):
                self.observer.on_resume(m, self.start_epoch, self.histories[m])
        self._started = self._saved = time.perf_counter()

    def on_fit_end(self) -> None:
        self.seconds += time.perf_counter() - self._started

    def make_generators(self) -> None:
        """Create the members' random-number generators on the training device."""

    def generators(self) -> dict[str, list[torch.Generator]]:
        """The generators whose state a checkpoint keeps, by name (active members')."""
        return {}

    def training_state(self, epochs_done: int) -> TrainingState:
        """Everything needed to continue exactly after ``epochs_done`` epochs."""
        tensors = prefixed("population", dict(self.population.named_parameters()))
        opt_tensors, opt_rest = optimizer_state(self.opt)
        tensors.update(prefixed("opt", opt_tensors))
        for name, gens in self.generators().items():
            tensors.update({f"rng.{name}.{i}": t for i, t in enumerate(generator_states(gens))})
        return tensors, {
            "epoch": epochs_done, "steps": self.steps, "members": self.members,
            "order_seeds": self.order_seeds, "histories": self.histories, "optimizer": opt_rest,
            "seconds": self.seconds + time.perf_counter() - self._started}

    def load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
                            ) -> None:
        """Put back what ``training_state`` saved (after ``make_generators``)."""
        self.steps, self.seconds = meta["steps"], meta["seconds"]
        self.histories = meta["histories"]
        members = meta["members"]
        if members and members != self.members:  # the members that had stopped: dropped
            self.keep_members([self.members.index(m) for m in members])
        self.members, self.order_seeds = members, meta["order_seeds"]
        if members:
            with torch.no_grad():
                for name, param in self.population.named_parameters():
                    param.copy_(tensors[f"population.{name}"])
        for name, gens in self.generators().items():
            for i, g in enumerate(gens):
                g.set_state(tensors[f"rng.{name}.{i}"])

    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()

    def training_step(self, chunk: list[torch.Tensor], batch_idx: int) -> None:
        """One optimiser step per (P, b) index batch of the chunk.

        Under ``bf16-mixed`` the whole chunk runs in one ``torch.autocast`` region; Lightning
        opens it with ``cache_enabled=False``, so each step casts the weights it has just
        changed (a cached bf16 copy would be the chunk's first weights)."""
        for idx in chunk:
            sums = self.batch_step(idx)  # (P, k) Σ_b metric_b · |b|
            sums = sums.to(wide(sums.dtype))  # bf16 under autocast: summed in float32
            self._sums = sums if self._sums is None else self._sums + sums
            self.steps += 1
        last = batch_idx + 1 >= len(self.chunks)
        if (self.checkpoint is not None and self.checkpoint_seconds is not None and not last
                and time.perf_counter() - self._saved >= self.checkpoint_seconds):
            tensors, meta = self.training_state(self.epoch)
            if self._sums is not None:
                tensors["sums"] = self._sums
            self.checkpoint.save((tensors, {**meta, "position": batch_idx + 1}))
            self._saved = time.perf_counter()

    def autograd_step(self, losses: torch.Tensor) -> None:
        """Backward of the members' summed losses (P,), then one optimiser step: the sum
        keeps each member's gradient its own (a mean would scale it by 1/P)."""
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.opt.step()

    def on_train_epoch_end(self) -> None:
        sums, self._sums = self._sums, None
        bad = [self.names[m] for m, ok in zip(self.members, torch.isfinite(sums[:, 0]).tolist())
               if not ok]
        if bad:  # checked once an epoch: a check per step would wait for the device each time
            raise FloatingPointError(
                f"{self.stage}: the loss of {', '.join(bad)} became non-finite in epoch "
                f"{self.epoch} (by step {self.steps})")
        epoch = self.epoch
        self.end_epoch(sums / self.n)
        if self.checkpoint is not None:  # before anyone is told: never ahead of a resume
            self.checkpoint.save(self.training_state(epoch + 1))
            self._saved = time.perf_counter()
        self.report(epoch, time.perf_counter() - self._epoch_started)

    def report(self, epoch: int, seconds: float) -> None:
        """Hand the epoch's rows and its progress to the observer."""
        ended, self._ended = self._ended, []
        for m, row in ended:
            self.observer.on_epoch_end(m, epoch, row)
        self.observer.on_progress(epoch, self.max_epochs, seconds,
                                  0 if self.trainer.should_stop else len(self.members))

    def record(self, rows: Sequence[dict[str, float]]) -> None:
        """Append row i to the history of the member at row i of the population."""
        for m, row in zip(self.members, rows):
            self.histories[m].append({"epoch": self.epoch, "step": self.steps, **row})
            self._ended.append((m, dict(row)))

    def keep_members(self, keep: Sequence[int]) -> None:
        """Drop every row of the population but ``keep``, with its optimiser state."""
        keep_t = torch.tensor(keep, device=self.device)
        old = list(self.population.parameters())
        self.population.select(keep_t)
        if self.opt is not None:
            self.opt = _slice_optimizer(old, list(self.population.parameters()), self.opt,
                                        self.optimizer_settings, keep_t)
        self.members = [self.members[i] for i in keep]
        self.order_seeds = [self.order_seeds[i] for i in keep]

    def batch_step(self, idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def end_epoch(self, means: torch.Tensor) -> None:
        raise NotImplementedError


def use_fused(fused: Optional[bool], optimizer: Mapping[str, Any]) -> bool:
    """The fused steps hand-code plain SGD; None picks them whenever that is the optimiser."""
    if fused is None:
        return plain_sgd(optimizer)
    if fused and not plain_sgd(optimizer):
        raise ValueError("fused=True needs plain SGD (no momentum, no weight decay)")
    return fused


def _slice_optimizer(old_params, new_params, optimizer, settings, keep):
    """A fresh optimiser over ``new_params`` carrying the members ``keep`` of the state."""
    new_opt = build_optimizer(new_params, settings)
    for old, new in zip(old_params, new_params):
        state = optimizer.state.get(old)
        if state:
            new_opt.state[new] = {
                k: v[keep].clone() if torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in state.items()
            }
    return new_opt
