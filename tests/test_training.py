"""Training through the engine (``training.engine``) on the CPU, single runs (P = 1).

Small generated problems with known answers: an autoencoder that must approach the entropy
floor of its data, a separable classifier that must reach 95% validation accuracy and come
back with its best weights, the early-stopping arithmetic by hand, bit-for-bit
reproducibility, the data order and its chunks, and divergence reports.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.nn import functional as F

from config.stages import RuntimeConfig
from models.classifier import DeepClassifier
from models.dae import DenoisingAutoencoder
from runtime.keys import Seed, derive_seed
from training.stopping_rules import stopping_rule
from training import batches
from training.batches import EpochChunks, epoch_permutation
from training.classifier_training import train_classifier_population
from training.dae_training import train_dae_population
from training.stopping_rules import EarlyStopping
from training.trainer import make_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on CPU

SGD = {"name": "sgd", "lr": 0.1}
CPU = RuntimeConfig(accelerator="cpu", precision="32-true")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pretrain(dae, x, x_valid=None, *, noise_seed=4, order_seed=5, epochs=1, batch_size=10,
             optimizer=SGD):
    """One autoencoder through the engine (P = 1); returns (state, history)."""
    result = train_dae_population([dae], x, x_valid, noise_seeds=[noise_seed],
                                  order_seeds=[order_seed], batch_size=batch_size,
                                  optimizer=optimizer, trainer=make_trainer(CPU, epochs))
    return result.states[0], result.histories[0]


def finetune(clf, x, y, x_valid, y_valid, *, order_seed=5, max_epochs=2, batch_size=10,
             optimizer=SGD, early_stopping="tutorial", **settings):
    """One classifier through the engine (P = 1), stopping on ``early_stopping``."""
    return train_classifier_population([clf], x, y, x_valid, y_valid, order_seeds=[order_seed],
                                       batch_size=batch_size, optimizer=optimizer,
                                       stopping=stopping_rule(early_stopping, **settings),
                                       trainer=make_trainer(CPU, max_epochs))


# --- pretraining one autoencoder ----------------------------------------------------------------

N_VIS = 20
PROTOTYPES = (torch.rand(3, N_VIS, generator=gen(0)) < 0.5).float()  # 3 binary patterns


def prototype_data(n: int, seed: int) -> torch.Tensor:
    """(n, 20) in [0,1]: a random prototype with every bit pulled towards 1/2 by ε ~ U(0, 0.05)."""
    g = gen(seed)
    p = PROTOTYPES[torch.randint(0, 3, (n,), generator=g)]
    eps = 0.05 * torch.rand(n, N_VIS, generator=g)
    return p * (1 - eps) + (1 - p) * eps


def entropy_floor(x: torch.Tensor) -> float:
    """The least cross-entropy any reconstruction can reach: Σ_i H(x_i), averaged over rows."""
    x = x.double()
    return float(-(x * x.log() + (1 - x) * (1 - x).log()).sum(dim=1).mean())


def test_pretraining_lowers_the_clean_validation_loss_towards_the_entropy_floor():
    x_train, x_valid = prototype_data(1200, 1), prototype_data(300, 2)
    dae = DenoisingAutoencoder(N_VIS, 10, noise="masking", corruption_level=0.2,
                               generator=gen(3))
    with torch.no_grad():
        before = dae.eval()(x_valid).item()
    epochs, steps = 4, 1200 // 20
    state, rows = pretrain(dae, x_train, x_valid, epochs=epochs, batch_size=20)
    dae.load_state_dict(state)
    with torch.no_grad():
        after = dae.eval()(x_valid).item()

    floor = entropy_floor(x_valid)
    assert floor <= after  # cross-entropy never goes below the entropy of its targets
    assert after < 0.5 * before, (before, after)
    assert after - floor < 0.1 * (before - floor), (before, after, floor)  # measured: 0.02

    assert [row["epoch"] for row in rows] == list(range(epochs))
    assert [row["step"] for row in rows] == [steps * (e + 1) for e in range(epochs)]
    for row in rows:
        assert {"recon_loss", "val_recon_loss"} <= row.keys()
        assert math.isfinite(row["recon_loss"]) and math.isfinite(row["val_recon_loss"])
    # the logged validation loss is the clean loss of the final weights
    assert rows[-1]["val_recon_loss"] == pytest.approx(after, rel=1e-5)
    assert rows[0]["val_recon_loss"] < before


# --- fine-tuning a classifier -------------------------------------------------------------------

CENTERS = 3 * torch.randn(3, 10, generator=gen(0))  # pairwise distances 12-15, noise σ = 1


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return CENTERS[y] + torch.randn(n, 10, generator=g), y


def test_finetuning_reaches_95_percent_and_restores_the_best_weights():
    (x_train, y_train), (x_valid, y_valid) = blobs(600, 1), blobs(300, 2)
    clf = DeepClassifier.random_init(10, [16], 3, generator=gen(3))
    steps = 600 // 20
    result = finetune(clf, x_train, y_train, x_valid, y_valid, max_epochs=20, batch_size=20,
                      early_stopping="tutorial", patience_batches=2)
    rows = result.histories[0]
    val_errors = [row["val_error"] for row in rows]
    clf.load_state_dict(result.states[0])
    with torch.no_grad():
        val_error = (clf.eval()(x_valid).argmax(dim=1) != y_valid).double().mean().item()
    assert val_error <= 0.05
    # the returned weights are the best epoch's, and the best epoch is not the last
    assert val_error == pytest.approx(min(val_errors), abs=1e-6) == result.best_val_error[0]
    assert result.best_epoch[0] == val_errors.index(min(val_errors)) < len(rows) - 1

    # The tutorial's rule replayed by hand on the logged history gives the same stop.
    patience, best, stop_epoch = 2 * steps, math.inf, None
    for row in rows:
        if row["val_error"] < best * 0.995:
            patience = max(patience, int(row["step"] * 2))
        best = min(best, row["val_error"])
        if row["step"] >= patience:
            stop_epoch = row["epoch"]
            break
    assert stop_epoch == rows[-1]["epoch"] < 19 and result.stopped_early[0]


# --- the early-stopping rule by hand --------------------------------------------------------------


def run_rule(stopping: EarlyStopping, errors: list[float], n_batches: int = 5):
    """Feed one validation error per epoch; returns (patience after each epoch, stop epoch,
    epoch whose weights are kept)."""
    patience, stopped_at, kept = [stopping.patience_steps], None, None
    for epoch, error in enumerate(errors):
        best, stop = stopping.update(error, step=n_batches * (epoch + 1), epoch=epoch)
        kept = epoch if best else kept
        patience.append(stopping.patience_steps)
        if stop:
            stopped_at = epoch
            break
    return patience, stopped_at, kept


def test_tutorial_rule_patience_arithmetic_by_hand():
    # 5 batches per epoch, so the step after epoch e is 5(e+1); patience starts at 2 × 5 = 10.
    errors = [
        0.5,    # e0, step 5:  significant (< inf);  patience = max(10, 5·2)  = 10
        0.4,    # e1, step 10: 0.4 < 0.5·0.995;      patience = max(10, 10·2) = 20
        0.399,  # e2, step 15: < best, but > 0.4·0.995 = 0.398: best moves, patience stays 20
        0.45,   # e3, step 20: worse; 20 >= 20 -> stop here
        0.1,    # never seen
    ]
    stopping = EarlyStopping("tutorial", steps_per_epoch=5, patience_batches=2,
                             patience_increase=2.0, improvement_threshold=0.995)
    patience, stopped_at, kept = run_rule(stopping, errors)
    assert patience == [10, 10, 20, 20, 20]
    assert stopped_at == 3 and stopping.stopped_early
    # had e2 counted as significant, patience would be 30 and e3 would not stop
    assert stopping.best == pytest.approx(0.399) and stopping.best_epoch == 2 == kept


def test_tutorial_rule_keeps_going_while_improvements_extend_patience():
    # Each epoch improves by 10%: patience = 2·step stays ahead of the step, no stop.
    errors = [0.9 ** e for e in range(8)]
    stopping = EarlyStopping(steps_per_epoch=4, patience_batches=1)
    patience, stopped_at, kept = run_rule(stopping, errors, n_batches=4)
    assert patience == [4] + [max(4, 8 * (e + 1)) for e in range(8)]
    assert stopped_at is None and not stopping.stopped_early
    assert stopping.best_epoch == 7 == kept


def test_patience_rule_stops_after_patience_epochs_without_significant_improvement():
    errors = [
        0.5,     # e0: significant, stale 0
        0.499,   # e1: not below 0.4975: stale 1 (best moves to 0.499)
        0.3,     # e2: significant, stale 0
        0.31,    # e3: stale 1
        0.2986,  # e4: < best 0.3 but > 0.2985: stale 2, best moves to 0.2986
        0.35,    # e5: stale 3 -> stop
        0.01,    # never seen
    ]
    # patience_batches=0: the tutorial rule would stop at once; the 'patience' rule ignores it
    stopping = EarlyStopping("patience", steps_per_epoch=5, patience_batches=0,
                             patience_epochs=3)
    _, stopped_at, kept = run_rule(stopping, errors)
    assert stopped_at == 5 and stopping.stopped_early
    assert stopping.best == pytest.approx(0.2986) and stopping.best_epoch == 4 == kept


def test_rule_none_never_stops_but_keeps_the_best():
    errors = [0.5, 0.2, 0.3, 0.4, 0.6]
    stopping = EarlyStopping("none", steps_per_epoch=5, patience_batches=0)
    _, stopped_at, kept = run_rule(stopping, errors)
    assert stopped_at is None and not stopping.stopped_early
    assert stopping.summary() == {"best_val_error": pytest.approx(0.2), "best_epoch": 1,
                                  "stopped_early": False}
    assert kept == 1


def test_early_stopping_rejects_an_unknown_rule_naming_the_choices():
    with pytest.raises(ValueError, match="sometimes.*tutorial"):
        EarlyStopping("sometimes", steps_per_epoch=5)
    with pytest.raises(ValueError, match="sometimes"):
        finetune(DeepClassifier.random_init(10, [4], 3), *blobs(20, 1), *blobs(20, 2),
                 early_stopping="sometimes")


# --- reproducibility ----------------------------------------------------------------------------


def train_tiny_classifier(order_seed: int) -> dict[str, torch.Tensor]:
    x, y = blobs(100, 7)
    clf = DeepClassifier.random_init(10, [8], 3,
                                     generator=gen(derive_seed(0, Seed.RANDOM_INIT)))
    return finetune(clf, x, y, x, y, order_seed=order_seed, early_stopping="none").states[0]


def test_same_seeds_give_bit_identical_weights_and_another_order_does_not():
    order = derive_seed(0, Seed.FINETUNE_ORDER)
    a, b = train_tiny_classifier(order), train_tiny_classifier(order)
    c = train_tiny_classifier(derive_seed(1, Seed.FINETUNE_ORDER))
    assert states_equal(a, b)
    assert not torch.equal(a["hidden.0.linear.weight"], c["hidden.0.linear.weight"])
    initial = DeepClassifier.random_init(10, [8], 3,
                                         generator=gen(derive_seed(0, Seed.RANDOM_INIT)))
    assert not torch.equal(a["hidden.0.linear.weight"], initial.hidden[0].W)


def train_tiny_dae(noise_seed: int, start_in_eval_mode: bool = False) -> dict[str, torch.Tensor]:
    x = prototype_data(100, 8)
    dae = DenoisingAutoencoder(N_VIS, 6, corruption_level=0.3, generator=gen(1))
    if start_in_eval_mode:
        dae.eval()  # e.g. after measuring its loss before training
    return pretrain(dae, x, noise_seed=noise_seed, order_seed=2)[0]


def test_the_corruption_noise_is_seeded_by_the_engine():
    a, b, c = train_tiny_dae(11), train_tiny_dae(11), train_tiny_dae(12)
    assert states_equal(a, b)
    assert not torch.equal(a["encoder.linear.weight"], c["encoder.linear.weight"])


def test_pretraining_corrupts_even_when_the_dae_arrives_in_eval_mode():
    """The engine trains a *denoising* autoencoder whatever mode the module was left in:
    Lightning keeps the mode it is given, and corruption applies only in training."""
    same = states_equal(train_tiny_dae(11, start_in_eval_mode=True), train_tiny_dae(11))
    assert same, "a DAE handed over in eval mode was trained without corruption"
    clean = DenoisingAutoencoder(N_VIS, 6, corruption_level=0.0, generator=gen(1))
    assert not states_equal(train_tiny_dae(11), pretrain(clean, prototype_data(100, 8),
                                                         noise_seed=11, order_seed=2)[0])


# --- data order -----------------------------------------------------------------------------------


class Seeds:
    """Stands in for the system an ``EpochChunks`` reads its members' seeds and device from."""

    def __init__(self, seeds):
        self.order_seeds, self.device = seeds, torch.device("cpu")


def test_every_epoch_is_a_permutation_fixed_by_seed_and_epoch_per_member(monkeypatch):
    monkeypatch.setattr(batches, "CHUNK_EXAMPLES", 10)  # two minibatches of 5 per chunk
    n, b = 23, 5
    system = Seeds([9, 10])
    chunks, replay = EpochChunks(system, n, b), EpochChunks(Seeds([9, 10]), n, b)
    assert len(chunks) == 3 and chunks.steps_per_epoch == 5
    epochs = []
    for epoch in range(3):
        got = list(chunks)
        assert [len(c) for c in got] == [2, 2, 1]
        idx = [i for c in got for i in c]
        assert [i.shape for i in idx] == [(2, 5)] * 4 + [(2, 3)]
        order = torch.cat(idx, dim=1)  # (members, n)
        for p, seed in enumerate((9, 10)):
            assert torch.equal(order[p], epoch_permutation(n, seed, epoch))
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[0][0], epochs[0][1])
    for epoch in range(3):  # a second loader with the same seeds replays the same epochs
        assert torch.equal(torch.cat([i for c in replay for i in c], dim=1), epochs[epoch])
    system.order_seeds = [10]  # member 0 stopped: the next epoch is member 1's alone
    assert torch.equal(torch.cat([i for c in chunks for i in c], dim=1)[0],
                       epoch_permutation(n, 10, 3))


@pytest.mark.parametrize("kind", ["dae", "classifier"])
def test_chunked_training_equals_one_minibatch_per_step(kind, monkeypatch):
    """The same steps in the same order: bit-identical weights and history."""
    x = prototype_data(60, 4)
    y = torch.arange(60) % 3

    def train(chunk_examples):
        monkeypatch.setattr(batches, "CHUNK_EXAMPLES", chunk_examples)
        if kind == "dae":
            model = DenoisingAutoencoder(N_VIS, 6, corruption_level=0.2, generator=gen(2))
            return pretrain(model, x, x, epochs=2, batch_size=7)
        model = DeepClassifier.random_init(N_VIS, [6], 3, generator=gen(2))
        result = finetune(model, x, y, x, y, max_epochs=2, batch_size=7, early_stopping="none")
        return result.states[0], result.histories[0]

    one, many = train(7), train(28)  # 1 and 4 minibatches per chunk
    assert one[1] == many[1] and one[1][-1]["step"] == 2 * math.ceil(60 / 7)
    assert states_equal(one[0], many[0])


# --- divergence -----------------------------------------------------------------------------------

MESSAGE = re.compile(r"^(?P<stage>.+): the loss of (?P<members>.+) became non-finite in epoch "
                     r"(?P<epoch>\d+) \(by step (?P<step>\d+)\)$")


def test_an_infinite_input_stops_pretraining_in_the_first_epoch_naming_the_member():
    x = prototype_data(40, 3)
    x[:, 0] = math.inf  # every batch holds an inf
    daes = [DenoisingAutoencoder(N_VIS, 5, corruption_level=0.1, generator=gen(s))
            for s in (1, 2)]
    with pytest.raises(FloatingPointError) as info:
        train_dae_population(daes, x, None, noise_seeds=[0, 1], order_seeds=[0, 1],
                             batch_size=10, optimizer=SGD, stage="pretrain/layer_2",
                             names=["seed 7", "seed 8"], trainer=make_trainer(CPU, 3))
    m = MESSAGE.match(str(info.value))
    assert m, str(info.value)
    assert (m["stage"], m["members"], m["epoch"], m["step"]) == (
        "pretrain/layer_2", "seed 7, seed 8", "0", "4")


def test_a_huge_learning_rate_is_reported_in_the_epoch_it_diverges():
    x, y = blobs(50, 4)
    lr = 1e6

    def fresh() -> DeepClassifier:
        return DeepClassifier.random_init(10, [16], 3, activation="relu", generator=gen(3))

    # The same full-batch SGD replayed by hand: the first step whose loss is not finite.
    clf, expected_step = fresh(), None
    opt = torch.optim.SGD(clf.parameters(), lr=lr)
    for step in range(50):
        idx = epoch_permutation(50, 6, step)  # one batch per epoch: epoch == step
        loss = F.cross_entropy(clf(x[idx]), y[idx])
        if not torch.isfinite(loss):
            expected_step = step
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert expected_step is not None and expected_step >= 1

    with pytest.raises(FloatingPointError) as info:
        finetune(fresh(), x, y, x, y, order_seed=6, max_epochs=50, batch_size=50,
                 optimizer={"name": "sgd", "lr": lr}, early_stopping="none")
    m = MESSAGE.match(str(info.value))
    assert m, str(info.value)
    assert m["members"] == "member 0"
    assert int(m["epoch"]) == expected_step and int(m["step"]) == expected_step + 1
