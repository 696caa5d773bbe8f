"""What a training stage tells whoever watches it, epoch by epoch.

The engine (``training.engine``) computes; it records nothing itself. At the end of every
epoch it hands each member's metrics to an ``EpochObserver``: a recorder (MLflow, in
``tracking.live``) or a progress line (``runtime.progress``) implements the methods it
needs. The engine calls them only after the epoch's resume checkpoint is written, so what
an observer has seen is never ahead of what a rerun continues from.
"""

from __future__ import annotations

from typing import Mapping, Sequence


class EpochObserver:
    """Hooks a stage calls while it trains; each does nothing here.

    ``member`` is a member's index in the population as it started (members that stop
    early keep their index and are no longer reported).
    """

    def on_resume(self, member: int, epoch: int, history: Sequence[Mapping[str, float]]
                  ) -> None:
        """The stage continues from a checkpoint: ``epoch`` epochs were done, and
        ``history`` holds member ``member``'s rows of those epochs (``epoch``, ``step`` and
        the metrics)."""

    def on_epoch_end(self, member: int, epoch: int, metrics: Mapping[str, float]) -> None:
        """Member ``member`` finished epoch ``epoch`` (0-based) with these metrics."""

    def on_progress(self, epoch: int, max_epochs: int, epoch_seconds: float,
                    active: int) -> None:
        """Epoch ``epoch`` (0-based) of at most ``max_epochs`` ended after
        ``epoch_seconds``; ``active`` members go on (0: the stage is done)."""

    def on_note(self, text: str) -> None:
        """Something a person should read, e.g. that a checkpoint was found damaged."""


class Observers(EpochObserver):
    """Several observers as one, called in the order given.

    Args:
        observers: The observers; None entries are left out.
    """

    def __init__(self, *observers: EpochObserver | None):
        self.observers = [o for o in observers if o is not None]

    def on_resume(self, member, epoch, history):
        for o in self.observers:
            o.on_resume(member, epoch, history)

    def on_epoch_end(self, member, epoch, metrics):
        for o in self.observers:
            o.on_epoch_end(member, epoch, metrics)

    def on_progress(self, epoch, max_epochs, epoch_seconds, active):
        for o in self.observers:
            o.on_progress(epoch, max_epochs, epoch_seconds, active)

    def on_note(self, text):
        for o in self.observers:
            o.on_note(text)
