"""The early-stopping rules of fine-tuning, one member at a time: ``EarlyStopping`` decides
from a member's validation errors when it stops; the engine keeps one per member of a
population (``training.early_stopped_system``), made by ``stopping_rule``."""

from __future__ import annotations

import math
from typing import Any, Callable

RULES = ("tutorial", "patience", "none")


class EarlyStopping:
    """Early stopping on a validation error; the caller keeps the best weights.

    Rules:
        ``tutorial`` (DeepLearningTutorials ``SdA.py``): patience starts at
            ``patience_batches × steps_per_epoch`` steps; a validation error below
            ``best × improvement_threshold`` raises it to ``max(patience, step ×
            patience_increase)``; training stops once ``step >= patience``. The rule is
            evaluated at each validation (every epoch, as in the tutorial, whose validation
            frequency is one epoch), so a run may end up to one epoch later than the
            tutorial's mid-epoch stop; the restored best weights are the same.
        ``patience``: stop after ``patience_epochs`` epochs without an improvement below
            ``best × improvement_threshold``.
        ``none``: never stop early; the best weights are still the ones kept.

    Args:
        rule: One of ``RULES``.
        steps_per_epoch: Optimiser steps per epoch.
        patience_batches, patience_increase, improvement_threshold, patience_epochs: As in
            ``config.stages.FinetuneConfig``.
    """

    def __init__(self, rule: str = "tutorial", *, steps_per_epoch: int,
                 patience_batches: int = 10, patience_increase: float = 2.0,
                 improvement_threshold: float = 0.995, patience_epochs: int = 10):
        if rule not in RULES:
            raise ValueError(f"unknown early-stopping rule {rule!r}; choose one of {RULES}")
        self.rule, self.patience_increase = rule, patience_increase
        self.threshold, self.patience_epochs = improvement_threshold, patience_epochs
        self.patience_steps = patience_batches * steps_per_epoch
        self.best, self.best_epoch = math.inf, -1
        self.stale_epochs = 0
        self.stopped_early = False

    def update(self, value: float, *, step: int, epoch: int) -> tuple[bool, bool]:
        """Take one epoch's validation error (after ``step`` optimiser steps in all).

        Returns:
            (best, stop): whether ``value`` is the best so far (keep these weights), and
            whether training stops now.
        """
        if value < self.best * self.threshold:
            self.patience_steps = max(self.patience_steps, int(step * self.patience_increase))
            self.stale_epochs = 0
        else:
            self.stale_epochs += 1
        best = value < self.best
        if best:
            self.best, self.best_epoch = value, epoch
        stop = (self.rule == "tutorial" and step >= self.patience_steps) or (
            self.rule == "patience" and self.stale_epochs >= self.patience_epochs)
        self.stopped_early = self.stopped_early or stop
        return best, stop

    def summary(self) -> dict[str, Any]:
        return {"best_val_error": self.best, "best_epoch": self.best_epoch,
                "stopped_early": self.stopped_early}


def stopping_rule(name: str, **settings: Any) -> Callable[[int], EarlyStopping]:
    """A factory of member p's ``EarlyStopping(name, steps_per_epoch=…, **settings)``; an
    unknown rule is refused here, before any training."""
    if name not in RULES:
        raise ValueError(f"unknown early-stopping rule {name!r}; choose one of {RULES}")
    return lambda steps_per_epoch: EarlyStopping(name, steps_per_epoch=steps_per_epoch,
                                                 **settings)


def rule_of(finetune: Any) -> Callable[[int], EarlyStopping]:
    """``stopping_rule`` of the rule a fine-tuning config names, with its settings
    (``config.stages.FinetuneConfig``: ``early_stopping``, ``patience_batches``,
    ``patience_increase``, ``improvement_threshold``, ``patience_epochs``)."""
    return stopping_rule(finetune.early_stopping, patience_batches=finetune.patience_batches,
                         patience_increase=finetune.patience_increase,
                         improvement_threshold=finetune.improvement_threshold,
                         patience_epochs=finetune.patience_epochs)
