"""Live progress: every epoch reaches the observer, and MLflow, as it ends (one batch per run
per epoch), while the stage still runs; nothing is logged twice."""

from __future__ import annotations

import collections

import pytest
import torch

from models.classifier import DeepClassifier
from models.dae import DenoisingAutoencoder
from runtime.progress import ProgressLine, duration
from training.stopping_rules import stopping_rule
from training.classifier_training import train_classifier_population
from training.dae_training import train_dae_population
from training.observer import EpochObserver, Observers

SGD = {"name": "sgd", "lr": 0.1}

from test_population import cpu_trainer, gen  # noqa: E402
from test_population import one_thread  # noqa: E402,F401 - the one-thread fixture


def classification_data(n=120, d=10, c=3):
    g = gen(0)
    x = torch.rand(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return x, y, x[:40], y[:40]


class Calls(EpochObserver):
    def __init__(self):
        self.ends, self.progress = [], []

    def on_epoch_end(self, member, epoch, metrics):
        self.ends.append((member, epoch, dict(metrics)))

    def on_progress(self, epoch, max_epochs, epoch_seconds, active):
        self.progress.append((epoch, max_epochs, active))


def test_every_members_epoch_reaches_the_observer_once_and_matches_the_history():
    """Both members stop early (no epoch counts as an improvement): nothing after, and
    what was reported is exactly its history."""
    x, y, xv, yv = classification_data()
    calls = Calls()
    clfs = [DeepClassifier.random_init(10, [8], 3, generator=gen(s)) for s in (1, 2)]
    result = train_classifier_population(
        clfs, x, y, xv, yv, order_seeds=[3, 3], batch_size=10, optimizer=SGD,
        stopping=stopping_rule("patience", patience_epochs=2, improvement_threshold=0.0),
        trainer=cpu_trainer(6), observer=calls)
    for m in (0, 1):
        seen = [(e, r) for mm, e, r in calls.ends if mm == m]
        assert [e for e, _ in seen] == [row["epoch"] for row in result.histories[m]]
        assert [r for _, r in seen] == [{k: v for k, v in row.items()
                                         if k not in ("epoch", "step")}
                                        for row in result.histories[m]]
    # a threshold of 0 never counts as an improvement: patience 2 stops both after epoch 1
    assert [p[0] for p in calls.progress] == [0, 1]
    assert calls.progress[-1] == (1, 6, 0)


def test_progress_line_says_epoch_of_at_most_n_and_time_left():
    lines = []
    line = ProgressLine("finetune-twins", lambda text, console: lines.append((text, console)),
                        console_every=0.0)
    line.on_progress(2, 50, 2.0, 2)
    assert lines == [("  finetune-twins: epoch 3 of at most 50, 2.0 s/epoch, "
                      "at most 1 min 34 s left", True)]
    line.on_progress(3, 50, 2.0, 0)
    assert lines[-1][0].endswith("at most 0 s left (stopped early)")
    assert duration(3725) == "1 h 02 min"


@pytest.fixture()
def tracker(layerwise_home):
    from tracking.tracker import Tracker

    return Tracker(f"sqlite:///{layerwise_home}/mlflow.db", "live")


def counting_batches(tracker, monkeypatch):
    """Count ``log_batch`` calls that carry metrics, per run."""
    calls = collections.Counter()
    real = tracker.client.log_batch

    def log_batch(run_id, metrics=(), **kwargs):
        if metrics:
            calls[run_id] += 1
        return real(run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", log_batch)
    return calls


def test_epochs_are_in_mlflow_while_the_stage_runs(tracker, monkeypatch):
    """Read back from the MLflow store at the end of epoch 2, from inside the training:
    epochs 0-2 are there, for both members' runs, one batch per run per epoch; the final
    histories have every epoch exactly once."""
    from tracking.live import LiveMetrics

    calls = counting_batches(tracker, monkeypatch)
    runs = {}
    for m in (0, 1):
        with tracker.run(f"member-{m}", {}) as run_id:
            runs[m] = run_id
    live = LiveMetrics(tracker, {m: (run, "pretrain/layer_1") for m, run in runs.items()})
    seen_at_epoch_2 = {}

    class Probe(EpochObserver):
        def on_progress(self, epoch, max_epochs, epoch_seconds, active):
            if epoch == 2:
                for m, run in runs.items():
                    history = tracker.client.get_metric_history(run, "pretrain/layer_1/recon_loss")
                    seen_at_epoch_2[m] = sorted(h.step for h in history)

    x = torch.rand(60, 20, generator=gen(0))
    daes = [DenoisingAutoencoder(20, 7, generator=gen(s)) for s in (1, 2)]
    result = train_dae_population(daes, x, x[:20], noise_seeds=[1, 2], order_seeds=[3, 4],
                                  batch_size=10, optimizer=SGD, trainer=cpu_trainer(4),
                                  observer=Observers(live, Probe()))
    assert seen_at_epoch_2 == {0: [0, 1, 2], 1: [0, 1, 2]}
    assert calls == {runs[0]: 4, runs[1]: 4}
    assert live.logged == set(runs.values())
    for m, run in runs.items():
        for key in ("recon_loss", "val_recon_loss"):
            history = tracker.client.get_metric_history(run, f"pretrain/layer_1/{key}")
            assert sorted(h.step for h in history) == [0, 1, 2, 3]
            assert sorted((h.step, h.value) for h in history) == [
                (row["epoch"], row[key]) for row in result.histories[m]]


TINY = ["data.n_train=300", "data.n_valid=100", "model.hidden_sizes=[16,8]",
        "pretrain.epochs=2", "finetune.max_epochs=3"]


def test_a_pipeline_logs_each_epoch_once_as_it_ends(shared_data_dir, prefect_harness,
                                                    layerwise_home, monkeypatch):
    """Every training stage's run gets one metric batch per epoch carrying that epoch only,
    no (key, step) twice; the twins' runs log the wall time they shared and say so."""
    from mlflow.tracking import MlflowClient

    from config.overrides import resolve_config
    from flows.pipeline import run_pipeline

    batches = []  # (run id, {(key, step)}) of every metric batch
    real = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), **kwargs):
        if metrics:
            batches.append((run_id, [(m.key, m.step) for m in metrics]))
        return real(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    config = resolve_config("quick", data_dir=shared_data_dir, sets=TINY)
    uri = f"sqlite:///{layerwise_home}/mlflow.db"
    result = run_pipeline(config, preset="quick", tracking_uri=uri, experiment="live")
    client = MlflowClient(uri)
    runs = {s.name: s.mlflow_run_id for s in result.stages}
    for stage, prefix in [("pretrain-layer-1", "pretrain/layer_1/"),
                          ("pretrain-layer-2", "pretrain/layer_2/"),
                          ("finetune-pretrained", "finetune/"), ("finetune-random", "finetune/")]:
        logged = [keys for run, keys in batches if run == runs[stage]]
        pairs = [pair for keys in logged for pair in keys]
        assert len(pairs) == len(set(pairs)), stage  # nothing logged twice
        epochs = [keys for keys in logged if any(k.endswith("loss") for k, _ in keys)]
        history = client.get_metric_history(runs[stage], epochs[0][0][0])
        assert len(epochs) == len(history) >= 2, stage  # one batch per epoch
        assert all(len({step for _, step in keys}) == 1 for keys in epochs), stage
        assert [keys[0][1] for keys in epochs] == sorted(h.step for h in history), stage
    arms = [client.get_run(runs[f"finetune-{arm}"]).data for arm in ("pretrained", "random")]
    assert {a.tags["layerwise.trained_together"] for a in arms} == {
        "finetune-pretrained,finetune-random"}
    assert arms[0].metrics["finetune/train_seconds"] == arms[1].metrics["finetune/train_seconds"]
    seconds = {s.name: s.seconds for s in result.stages}
    assert seconds["finetune-pretrained"] == seconds["finetune-random"]
