"""Per-epoch metrics in MLflow as the epochs end: the recorder side of
``training.observer.EpochObserver``.

Member p of a stage's population writes to its own run under its own prefix
(``pretrain/layer_2``, ``finetune``), with ``step`` = epoch: one ``log_batch`` per run per
epoch. A resumed stage first writes the epochs its checkpoint holds, in one batch, and tags
the run ``layerwise.resumed_from_epoch``, so the run's history has every epoch once.

An ablation's cell and layer runs are opened by the flow and written from whichever worker
trains them (``RetriedLiveMetrics``): a retried or resumed attempt skips the epochs a run
already holds, a store the worker cannot write to stops the live record rather than the
training, and the flow completes the history when the work settles (``complete_history``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

from pydantic import BaseModel

from training.observer import EpochObserver
from tracking.retries import with_retries
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
        self.tracker.set_tags(self.runs[member][0], {RESUMED_TAG: epoch})
        self._log(member, list(history))

    def on_epoch_end(self, member: int, epoch: int, metrics: Mapping[str, float]) -> None:
        if member in self.runs:
            self._log(member, [{"epoch": epoch, **metrics}])

    def _log(self, member: int, rows: list[Mapping[str, float]]) -> None:
        run, prefix = self.runs[member]
        if rows:
            self.tracker.log_history(run, prefix, [dict(row) for row in rows])
        self.logged.add(run)


class RetriedLiveMetrics(LiveMetrics):
    """``LiveMetrics`` for runs that an earlier attempt of the same work may have written
    to (a retried task, a cell continued on another worker): each run's epochs up to the
    last one it holds are not logged again, so its history has every epoch once. A write
    that fails stops that run's live record, says so once through ``warn``, and leaves the
    training alone: the rest is logged when the work ends (``complete_history``).
    """

    def __init__(self, tracker: Tracker, runs: Mapping[int, tuple[str, str]],
                 warn: Callable[[str], None]):
        super().__init__(tracker, runs)
        self.warn = warn
        self.through: dict[int, int] = {}  # member: the last epoch its run held
        self.stopped: set[int] = set()

    def on_resume(self, member: int, epoch: int, history: Sequence[Mapping[str, float]]
                  ) -> None:
        self._guarded(member, super().on_resume, member, epoch, history)

    def on_epoch_end(self, member: int, epoch: int, metrics: Mapping[str, float]) -> None:
        self._guarded(member, super().on_epoch_end, member, epoch, metrics)

    def _guarded(self, member: int, log: Callable[..., None], *args: object) -> None:
        if member in self.stopped:
            return
        try:
            log(*args)
        except Exception as exc:  # noqa: BLE001 - the record must not stop the training
            self.stopped.add(member)
            run = self.runs[member][0]
            self.warn(f"live metrics of MLflow run {run} stopped ({type(exc).__name__}: "
                      f"{str(exc)[:200]}); its epochs are logged when the work settles")

    def _log(self, member: int, rows: list[Mapping[str, float]]) -> None:
        if rows and member not in self.through:
            run, prefix = self.runs[member]
            self.through[member] = logged_through(self.tracker, run, prefix, rows[0])
        super()._log(member, [r for r in rows if int(r["epoch"]) > self.through.get(member, -1)])


def metric_names(row: Mapping[str, float]) -> list[str]:
    """The metrics of a history row (its keys other than ``epoch`` and ``step``)."""
    return [name for name in row if name not in ("epoch", "step")]


def logged_through(tracker: Tracker, run: str, prefix: str, row: Mapping[str, float]) -> int:
    """The last epoch ``run`` holds of the history that ``row`` is a row of (-1: none)."""
    names = metric_names(row)
    if not names:
        return -1
    history = with_retries(tracker.client.get_metric_history, run, f"{prefix}/{names[0]}")
    return max((m.step for m in history), default=-1)


def complete_history(tracker: Tracker, run: str, prefix: str,
                     history: Sequence[Mapping[str, float]]) -> None:
    """Log the epochs of ``history`` that ``run`` does not hold yet: all of them for a
    stage that came from the cache, none when every epoch was logged live, the rest when
    the live record stopped."""
    if not history:
        return
    through = logged_through(tracker, run, prefix, history[0])
    rest = [dict(row) for row in history if int(row["epoch"]) > through]
    if rest:
        tracker.log_history(run, prefix, rest)


class LiveRun(BaseModel):
    """A run opened by one process (the ablation's flow) that another (the worker training
    the cell) writes epochs to as they end."""

    tracking_uri: str
    experiment: str
    run_id: str


_TRACKERS: dict[tuple[str, str], Optional[Tracker]] = {}


def retried_live_metrics(runs: Mapping[int, Optional[LiveRun]], prefix: str,
                         warn: Callable[[str], None]) -> Optional[RetriedLiveMetrics]:
    """The observer that logs member p's epochs to ``runs[p]`` under ``prefix``, or None
    when there is nothing to log to or this process cannot reach the store: a worker on a
    machine without the SQLite file logs nothing live (and creates no store of its own),
    and the flow logs the history when the work settles."""
    targets = {p: run for p, run in runs.items() if run is not None}
    if not targets:
        return None
    first = next(iter(targets.values()))
    key = (first.tracking_uri, first.experiment)
    if key not in _TRACKERS:  # one per process
        _TRACKERS[key] = _reach(*key, warn)
    if (tracker := _TRACKERS[key]) is None:
        return None
    return RetriedLiveMetrics(tracker, {p: (run.run_id, prefix) for p, run in targets.items()},
                              warn)


def _reach(uri: str, experiment: str, warn: Callable[[str], None]) -> Optional[Tracker]:
    from pathlib import Path

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    try:
        return Tracker(uri, experiment)
    except Exception as exc:  # noqa: BLE001 - no live record is no reason to stop training
        warn(f"no live metrics from this process: {exc}")
        return None
