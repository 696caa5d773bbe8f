"""Epoch checkpoints: a stage killed after any epoch and run again continues from its last
checkpoint and ends bit for bit where the uninterrupted stage ends (weights, histories,
stopping), for every stage kind, P = 1 and P > 1, in 32-true and bf16-mixed."""

from __future__ import annotations

import pytest
import torch

from config.stages import RuntimeConfig
from models.autoencoder import AutoencoderPopulation, random_state
from models.classifier import DeepClassifier
from models.dae import DenoisingAutoencoder
from training.stopping_rules import stopping_rule
from training.autoencoder_training import train_autoencoder_population
from training.classifier_training import train_classifier_population
from training.dae_training import train_dae_population
from training.epoch_checkpoint import SLOTS, EpochCheckpoint
from training.observer import EpochObserver
from training.trainer import make_trainer

SGD = {"name": "sgd", "lr": 0.1}
MOMENTUM = {"name": "sgd", "lr": 0.05, "momentum": 0.9}


def trainer(epochs, precision):
    return make_trainer(RuntimeConfig(accelerator="cpu", precision=precision), epochs)

from test_population import gen, one_thread  # noqa: E402,F401 - the one-thread fixture


class Killed(Exception):
    pass


class KillAfter(EpochObserver):
    """Raises once epoch ``epoch`` has ended (its checkpoint is written by then)."""

    def __init__(self, epoch: int):
        self.epoch, self.resumed, self.notes = epoch, {}, []

    def on_resume(self, member, epoch, history):
        self.resumed[member] = (epoch, len(history))

    def on_progress(self, epoch, max_epochs, epoch_seconds, active):
        if epoch == self.epoch:
            raise Killed(f"killed after epoch {epoch}")

    def on_note(self, text):
        self.notes.append(text)


def dae_stage(P, precision, resume_dir=None, observer=None, **kw):
    x = torch.rand(60, 20, generator=gen(0))
    daes = [DenoisingAutoencoder(20, 7, corruption_level=0.3, generator=gen(s))
            for s in range(P)]
    return train_dae_population(
        daes, x, x[:20], noise_seeds=[10 + s for s in range(P)],
        order_seeds=[20 + s for s in range(P)], batch_size=10,
        optimizer=MOMENTUM, trainer=trainer(5, precision),
        observer=observer, resume_dir=resume_dir, **kw)


def classifier_stage(P, precision, resume_dir=None, observer=None, **kw):
    g = gen(1)
    x, y = torch.rand(80, 10, generator=g), torch.randint(0, 3, (80,), generator=g)
    clfs = [DeepClassifier.random_init(10, [8, 6], 3, dropout=0.2, generator=gen(100 + s))
            for s in range(P)]
    # patience 2: member 1 (at P > 1) stops before the kill in some seeds; the rest run on
    return train_classifier_population(
        clfs, x, y, x[:30], y[:30], order_seeds=[5] * P, batch_size=10,
        optimizer=SGD if P == 1 else MOMENTUM,
        stopping=stopping_rule("patience", patience_epochs=2),
        dropout_seeds=[7 + s for s in range(P)], trainer=trainer(7, precision),
        observer=observer, resume_dir=resume_dir, **kw)


def autoencoder_stage(P, precision, resume_dir=None, observer=None, **kw):
    x = torch.rand(60, 12, generator=gen(2))
    acts = ["sigmoid", "linear"]
    states = [random_state([12, 6, 3], acts, "tutorial", tied=False, generator=gen(200 + s))
              for s in range(P)]
    population = AutoencoderPopulation(states, acts, "cross_entropy")
    return train_autoencoder_population(
        population, x, x[:20], order_seeds=[3] * P, batch_size=10,
        optimizer={"name": "adam", "lr": 0.01}, stopping=stopping_rule("none"),
        trainer=trainer(5, precision), observer=observer,
        resume_dir=resume_dir, **kw)


def same(a, b):
    assert len(a.states) == len(b.states)
    for sa, sb in zip(a.states, b.states):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.histories == b.histories
    assert (a.best_val_error, a.best_epoch, a.stopped_early) == (
        b.best_val_error, b.best_epoch, b.stopped_early)


STAGES = {"dae": dae_stage, "classifier": classifier_stage, "autoencoder": autoencoder_stage}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("kind", sorted(STAGES))
def test_a_stage_killed_and_run_again_ends_bit_identical(kind, P, precision, tmp_path):
    stage = STAGES[kind]
    uninterrupted = stage(P, precision)
    kill = KillAfter(2)
    with pytest.raises(Killed):
        stage(P, precision, tmp_path, kill)
    assert any((tmp_path / slot).is_file() for slot in SLOTS)
    watch = KillAfter(-1)
    resumed = stage(P, precision, tmp_path, watch)
    same(resumed, uninterrupted)
    assert {e for e, _ in watch.resumed.values()} == {3}
    assert all(n == min(3, len(h)) for (_, n), h in
               zip(watch.resumed.values(), uninterrupted.histories))
    assert not tmp_path.exists()  # removed once the stage has its result


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("kind", sorted(STAGES))
def test_a_stage_killed_inside_an_epoch_resumes_there_bit_identical(kind, precision, tmp_path,
                                                                    monkeypatch):
    """Chunks of 2 minibatches and ``checkpoint_seconds=0``: a checkpoint after every chunk.
    Killed just before the sixth write (the fifth was inside epoch 1), the stage continues
    from the middle of that epoch and ends as the uninterrupted one."""
    import training.batches

    monkeypatch.setattr(training.batches, "CHUNK_EXAMPLES", 20)
    stage = STAGES[kind]
    uninterrupted = stage(2, precision)
    written, real = [], EpochCheckpoint.save

    def save(self, state):
        if len(written) == 5:
            raise Killed("killed between two chunks")
        written.append((state[1]["epoch"], state[1].get("position", 0)))
        return real(self, state)

    monkeypatch.setattr(EpochCheckpoint, "save", save)
    with pytest.raises(Killed):
        stage(2, precision, tmp_path, checkpoint_seconds=0.0)
    assert written[-1][1] > 0, written  # the newest checkpoint is inside an epoch
    monkeypatch.setattr(EpochCheckpoint, "save", real)
    watch = KillAfter(-1)
    resumed = stage(2, precision, tmp_path, watch, checkpoint_seconds=0.0)
    same(resumed, uninterrupted)
    assert {e for e, _ in watch.resumed.values()} == {written[-1][0]}


def test_a_checkpoint_cut_short_is_skipped_with_one_line(tmp_path):
    """The newest slot damaged (as by a kill during a write that was not atomic) and a
    write left unfinished: the older slot is used, said once, and the end is the same."""
    uninterrupted = classifier_stage(2, "32-true")
    with pytest.raises(Killed):
        classifier_stage(2, "32-true", tmp_path, KillAfter(3))
    newest = max((tmp_path / slot for slot in SLOTS), key=lambda p: p.stat().st_mtime_ns)
    newest.write_bytes(newest.read_bytes()[:200])
    (tmp_path / ".epoch-b.safetensors.x1.tmp").write_bytes(b"partial")
    watch = KillAfter(-1)
    resumed = classifier_stage(2, "32-true", tmp_path, watch)
    same(resumed, uninterrupted)
    assert {e for e, _ in watch.resumed.values()} == {3}
    assert len(watch.notes) == 1 and "cut short" in watch.notes[0]
    assert "epoch 3" in watch.notes[0]


def test_a_checkpoint_of_another_stage_is_not_resumed(tmp_path):
    with pytest.raises(Killed):
        dae_stage(1, "32-true", tmp_path, KillAfter(1))
    watch = KillAfter(-1)
    classifier_stage(1, "32-true", tmp_path, watch)
    assert watch.resumed == {}
