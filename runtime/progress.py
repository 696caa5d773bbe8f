"""Who watches the stage that is training now, and the progress line it shows.

The recorder that wraps a stage (``tracking.recorder.PipelineRecorder``) installs its observer
(a ``training.observer.EpochObserver``) with ``watching`` around the stage's task; the task
hands ``current_observer()`` to the training function. A context variable, not a task
argument: it is not part of what a stage computes, so it stays out of the task's
parameters and cache key (Prefect runs a task with the flow's context, variables included).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import Callable, Iterator, Mapping, Optional, Protocol, Sequence


class Observer(Protocol):
    """The hooks a training stage calls each epoch (``training.observer.EpochObserver``),
    named here by their shape: this layer imports no training code."""

    def on_resume(self, member: int, epoch: int, history: Sequence[Mapping[str, float]]
                  ) -> None: ...

    def on_epoch_end(self, member: int, epoch: int, metrics: Mapping[str, float]) -> None: ...

    def on_progress(self, epoch: int, max_epochs: int, epoch_seconds: float,
                    active: int) -> None: ...

    def on_note(self, text: str) -> None: ...


_CURRENT: contextvars.ContextVar[Optional[Observer]] = contextvars.ContextVar(
    "layerwise_epoch_observer", default=None)


def current_observer() -> Optional[Observer]:
    """The observer of the stage running now, or None outside a recorded stage."""
    return _CURRENT.get()


@contextlib.contextmanager
def watching(observer: Observer) -> Iterator[Observer]:
    """Make ``observer`` the current one for the code inside."""
    token = _CURRENT.set(observer)
    try:
        yield observer
    finally:
        _CURRENT.reset(token)


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLine:
    """One line per epoch: ``epoch 3 of at most 50, 2.1 s/epoch, at most 1 min 40 s left``.

    Every line goes to ``log`` (the Prefect flow run's logs); the console gets one when
    ``console_every`` seconds have passed since its last (a short stage stays quiet there,
    a long one says where it is) and when the stage ends early.

    Args:
        stage: Names the stage in the line, e.g. ``finetune-twins``.
        log: Called with each line and whether the console shows it too
            (``runtime.console.announce``).
        console_every: Seconds between two console lines.
    """

    def __init__(self, stage: str, log: Callable[[str, bool], None],
                 console_every: float = 30.0):
        self.stage, self.log, self.console_every = stage, log, console_every
        self.seconds: list[float] = []
        self._last_console = time.monotonic()

    def on_resume(self, member, epoch, history):
        if member == 0:
            self.log(f"  {self.stage}: resumed after epoch {epoch} from its checkpoint", True)

    def on_epoch_end(self, member, epoch, metrics):
        pass  # the line tells progress, not metrics

    def on_note(self, text):
        self.log(f"  {self.stage}: {text}", True)

    def on_progress(self, epoch, max_epochs, epoch_seconds, active):
        self.seconds.append(epoch_seconds)
        mean = sum(self.seconds[-5:]) / len(self.seconds[-5:])  # the recent pace
        left = (max_epochs - epoch - 1) * mean if active else 0.0
        line = (f"  {self.stage}: epoch {epoch + 1} of at most {max_epochs}, "
                f"{epoch_seconds:.1f} s/epoch, at most {duration(left)} left"
                + ("" if active or epoch + 1 == max_epochs else " (stopped early)"))
        now = time.monotonic()
        console = now - self._last_console >= self.console_every
        if console:
            self._last_console = now
        self.log(line, console)
