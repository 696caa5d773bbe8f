"""Per-epoch metrics in MLflow as the epochs end: the recorder side of
``training.observer.EpochObserver``.

Member p of a stage's population writes to its own run under its own prefix
(``pretrain/layer_2``, ``finetune``), with ``step`` = epoch: one ``log_batch`` per run per
epoch. A resumed stage first writes the epochs its checkpoint holds, in one batch, and tags
the run ``layerwise.resumed_from_epoch``, so the run's history has every epoch once.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from training.observer import EpochObserver
from tracking.tracker import Tracker
from tracking.vocabulary import RESUMED_TAG


class LiveMetrics(EpochObserver):
    """Logs each member's epoch to its run as the epoch ends.

    Args:
        tracker: The MLflow writer.
        runs: Member p's (run id, metric prefix); members not listed are not logged.
    """

    def __init__(self, tracker: Tracker, runs: Mapping[int, tuple[str, str]]):
        self.tracker, self.runs = tracker, dict(runs)
        self.logged: set[str] = set()  # runs that received epochs: their history is complete

    def on_resume(self, member: int, epoch: int, history: Sequence[Mapping[str, float]]
                  ) -> None:
        if member not in self.runs:
            return
        run, prefix = self.runs[member]
        self.tracker.set_tags(run, {RESUMED_TAG: epoch})
        if history:
            self.tracker.log_history(run, prefix, list(history))
        self.logged.add(run)

    def on_epoch_end(self, member: int, epoch: int, metrics: Mapping[str, float]) -> None:
        if member not in self.runs:
            return
        run, prefix = self.runs[member]
        self.tracker.log_history(run, prefix, [{"epoch": epoch, **metrics}])
        self.logged.add(run)
