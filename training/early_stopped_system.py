"""What the engine's early-stopped stage kinds share (``ClassifierSystem``,
``AutoencoderSystem``): one ``EarlyStopping`` per member over a validation score
(``training.stopping_rules``), each member's best weights kept on the CPU, a stopped member
dropped from the batch, and the per-member outcome with its rule's summary as a
``PopulationResult``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from training.engine import PopulationResult, PopulationSystem, cpu_state
from training.epoch_checkpoint import TrainingState, prefixed, under
from training.stopping_rules import EarlyStopping


class EarlyStoppedSystem(PopulationSystem):
    """A ``PopulationSystem`` whose members stop on their own validation score. Subclasses
    set ``self.population`` and call ``init_stopping`` in ``__init__`` and ``apply_stopping``
    at the end of each epoch."""

    def init_stopping(self, P: int, stopping: Callable[[int], EarlyStopping],
                      n_train: int, batch_size: int) -> None:
        steps_per_epoch = -(-n_train // batch_size)
        self.stopping = [stopping(steps_per_epoch) for _ in range(P)]
        self.best_state: list[Optional[dict[str, torch.Tensor]]] = [None] * P
        self.final_state: list[Optional[dict[str, torch.Tensor]]] = [None] * P

    def apply_stopping(self, scores: Sequence[float]) -> None:
        """Update each active member's rule with its score (lower is better); keep its best
        weights; drop the members that stop; stop the fit when none is left."""
        keep = []
        for i, (m, score) in enumerate(zip(self.members, scores)):
            best, stop = self.stopping[m].update(score, step=self.steps, epoch=self.epoch)
            if best:
                self.best_state[m] = cpu_state(self.population, i)
            if stop:
                self.final_state[m] = self.best_state[m]
            else:
                keep.append(i)
        if not keep:
            self.members = []
            self.trainer.should_stop = True
        elif len(keep) < len(self.members):  # drop the stopped members from the batch
            self.keep_members(keep)

    def training_state(self, epochs_done: int) -> TrainingState:
        """The engine's state, each member's best weights and its rule's counters."""
        tensors, meta = super().training_state(epochs_done)
        for m, state in enumerate(self.best_state):
            if state is not None:
                tensors.update(prefixed(f"best.{m}", state))
        meta["stopping"] = [vars(s) for s in self.stopping]
        meta["stopped"] = [m for m, s in enumerate(self.final_state) if s is not None]
        return tensors, meta

    def load_training_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
                            ) -> None:
        super().load_training_state(tensors, meta)
        self.best_state = [under(f"best.{m}", tensors) or None
                           for m in range(len(self.best_state))]
        for rule, saved in zip(self.stopping, meta["stopping"]):
            rule.__dict__.update(saved)
        for m in meta["stopped"]:  # a stopped member's final weights are its best
            self.final_state[m] = self.best_state[m]

    def result(self) -> PopulationResult:
        for i, m in enumerate(self.members):  # ran out of epochs: the best weights
            self.final_state[m] = self.best_state[m] or cpu_state(self.population, i)
        summaries = [s.summary() for s in self.stopping]
        return PopulationResult(
            states=list(self.final_state), histories=self.histories,
            best_val_error=[s["best_val_error"] for s in summaries],
            best_epoch=[s["best_epoch"] for s in summaries],
            stopped_early=[s["stopped_early"] for s in summaries], seconds=self.seconds)
