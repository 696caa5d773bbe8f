"""What watching and resuming cost: live MLflow logging of an epoch and the per-epoch
checkpoint, as a fraction of one epoch at the ``default`` preset's sizes.

The twins' fine-tuning (784-1000-1000-1000-10 sigmoid, two members, batch 20, SGD lr 0.1;
its checkpoint is the largest of the pipeline's: both members' weights and best weights)
runs ``EPOCHS`` epochs of ``N_TRAIN`` examples with an epoch checkpoint and live logging to
an MLflow SQLite store in a temporary folder, the two timed where they happen. The default
epoch (50,000 examples, validation on 10,000) is extrapolated from the measured one: its
training part scales with the examples, its validation part is measured as is.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Data, device, float32_trainer
from models.classifier import DeepClassifier
from training.epoch_checkpoint import EpochCheckpoint
from training.observer import EpochObserver, Observers
from training.stopping_rules import stopping_rule
from training.classifier_training import train_classifier_population

SIZES = (784, 1000, 1000, 1000)
N_TRAIN, DEFAULT_N_TRAIN, EPOCHS = 2000, 50_000, 3
#: Issue 25's target: each at most this fraction of an epoch at default's sizes.
MAX_FRACTION = 0.02


class _Timed(EpochObserver):
    """Wraps an observer's ``on_epoch_end``, summing its seconds; keeps the epochs' times."""

    def __init__(self, inner: EpochObserver):
        self.inner, self.seconds, self.epochs = inner, 0.0, []

    def on_epoch_end(self, member, epoch, metrics):
        started = time.perf_counter()
        self.inner.on_epoch_end(member, epoch, metrics)
        self.seconds += time.perf_counter() - started

    def on_progress(self, epoch, max_epochs, epoch_seconds, active):
        self.epochs.append(epoch_seconds)


def run(data: Data, log=print) -> dict[str, Any]:
    from training.classifier_population import ClassifierPopulation
    from training.population_eval import classifier_valid
    from tracking.live import LiveMetrics
    from tracking.tracker import Tracker

    dev = device()
    x, y = data.x_train[:N_TRAIN].to(dev), data.y_train[:N_TRAIN].to(dev)
    xv, yv = data.x_valid.to(dev), data.y_valid.to(dev)
    twins = [DeepClassifier.random_init(SIZES[0], list(SIZES[1:]), 10,
                                        generator=torch.Generator().manual_seed(s))
             for s in (1, 2)]
    saves: list[float] = []
    sizes: list[int] = []
    real_save = EpochCheckpoint.save

    def timed_save(self, state):
        started = time.perf_counter()
        path = real_save(self, state)
        saves.append(time.perf_counter() - started)
        sizes.append(path.stat().st_size)
        return path

    with tempfile.TemporaryDirectory() as tmp:
        tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "bench")
        runs = {}
        for m in (0, 1):
            with tracker.run(f"arm-{m}", {}) as run_id:
                runs[m] = (run_id, "finetune")
        live = _Timed(LiveMetrics(tracker, runs))
        started = time.perf_counter()
        pop = ClassifierPopulation(twins).to(dev).eval()
        classifier_valid(pop, xv, yv, 4096)
        valid_s = time.perf_counter() - started
        EpochCheckpoint.save = timed_save
        try:
            train_classifier_population(
                twins, x, y, xv, yv, order_seeds=[3, 3], batch_size=20,
                optimizer={"name": "sgd", "lr": 0.1}, stopping=stopping_rule("none"),
                trainer=float32_trainer(EPOCHS), observer=Observers(live),
                resume_dir=Path(tmp) / "resume")
        finally:
            EpochCheckpoint.save = real_save
    save_s = sum(saves[1:]) / max(1, len(saves) - 1)  # the first pays for the folder
    log_s = live.seconds / EPOCHS
    epoch_s = min(live.epochs)  # includes validation and the checkpoint
    train_s = max(epoch_s - valid_s - save_s, 1e-9)
    default_epoch_s = train_s * DEFAULT_N_TRAIN / N_TRAIN + valid_s
    row = {"sizes": list(SIZES), "members": 2, "examples": N_TRAIN,
           "epoch_s": round(epoch_s, 3), "default_epoch_s_extrapolated": round(default_epoch_s, 1),
           "live_logging_s": round(log_s, 4), "checkpoint_s": round(save_s, 4),
           "checkpoint_mb": round(max(sizes) / 2**20, 1), "checkpoints_kept": 2,
           "live_logging_fraction": round(log_s / default_epoch_s, 5),
           "checkpoint_fraction": round(save_s / default_epoch_s, 5),
           "checkpoint_fraction_measured_epoch": round(save_s / epoch_s, 4)}
    log(f"  epoch of {N_TRAIN} examples {epoch_s:.2f} s (default's 50,000: about "
        f"{default_epoch_s:.0f} s); live logging {1000 * log_s:.1f} ms/epoch "
        f"({100 * row['live_logging_fraction']:.3f} %), checkpoint {1000 * save_s:.0f} ms/epoch "
        f"({100 * row['checkpoint_fraction']:.2f} % of default's epoch)")
    return row
