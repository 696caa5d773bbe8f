"""Training through the real Lightning systems and ``tasks.runtime.make_trainer`` on CPU.

Small generated problems with known answers: an autoencoder that must approach the entropy
floor of its data, a separable classifier that must reach 95% validation accuracy and come
back with its best weights, the tutorial's early-stopping arithmetic on a fake trainer,
bit-for-bit reproducibility, the data order, and divergence reports.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.nn import functional as F

from models.batches import (ChunkedBatches, DeviceBatches, TensorDataModule,
                            default_steps_per_batch, epoch_permutation)
from models.callbacks import EpochHistory, TutorialEarlyStopping
from models.classifier import DeepClassifier
from models.dae import DenoisingAutoencoder
from models.finetune_module import LitClassifier
from models.pretrain_module import LitDenoisingAutoencoder
from tasks.config import RuntimeConfig
from tasks.runtime import derive_seed, make_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on CPU

SGD = {"name": "sgd", "lr": 0.1}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cpu_trainer(max_epochs: int, callbacks: list) -> L.Trainer:
    return make_trainer(RuntimeConfig(accelerator="cpu"), max_epochs, callbacks)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
    dae.train()  # Lightning keeps the mode it is given: train with corruption
    system = LitDenoisingAutoencoder(dae, layer=1, optimizer=SGD, seed=4)
    history = EpochHistory(system.prefix)
    epochs, batches = 4, 1200 // 20
    cpu_trainer(epochs, [history]).fit(
        system, datamodule=TensorDataModule((x_train,), (x_valid,), batch_size=20, seed=5))
    with torch.no_grad():
        after = dae.eval()(x_valid).item()

    floor = entropy_floor(x_valid)
    assert floor <= after  # cross-entropy never goes below the entropy of its targets
    assert after < 0.5 * before, (before, after)
    assert after - floor < 0.1 * (before - floor), (before, after, floor)  # measured: 0.02

    assert [row["epoch"] for row in history.rows] == list(range(epochs))
    assert [row["step"] for row in history.rows] == [batches * (e + 1) for e in range(epochs)]
    for row in history.rows:
        assert {"recon_loss", "val_recon_loss"} <= row.keys()
        assert math.isfinite(row["recon_loss"]) and math.isfinite(row["val_recon_loss"])
    # the logged validation loss is the clean loss of the final weights
    assert history.rows[-1]["val_recon_loss"] == pytest.approx(after, rel=1e-5)
    assert history.rows[0]["val_recon_loss"] < before


# --- fine-tuning a classifier -------------------------------------------------------------------

CENTERS = 3 * torch.randn(3, 10, generator=gen(0))  # pairwise distances 12-15, noise σ = 1


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return CENTERS[y] + torch.randn(n, 10, generator=g), y


class LastWeights(L.Callback):
    """Keeps the weights as they are when training ends, before best weights are restored."""

    def on_train_end(self, trainer, pl_module):
        self.state = snapshot(pl_module)


def test_finetuning_reaches_95_percent_and_restores_the_best_weights():
    (x_train, y_train), (x_valid, y_valid) = blobs(600, 1), blobs(300, 2)
    clf = DeepClassifier.random_init(10, [16], 3, generator=gen(3))
    system = LitClassifier(clf, "random", SGD)
    history, last = EpochHistory(system.prefix), LastWeights()
    stopping = TutorialEarlyStopping(monitor="finetune/random/val_error", patience_batches=2)
    batches = 600 // 20
    cpu_trainer(20, [history, last, stopping]).fit(  # ``last`` runs before the restore
        system,
        datamodule=TensorDataModule((x_train, y_train), (x_valid, y_valid), 20, seed=5))

    clf.eval()
    with torch.no_grad():
        val_error = (clf(x_valid).argmax(dim=1) != y_valid).double().mean().item()
    assert val_error <= 0.05
    assert val_error == pytest.approx(stopping.best, abs=1e-6)
    assert states_equal(snapshot(system), stopping.best_state)

    val_errors = [row["val_error"] for row in history.rows]
    assert stopping.best == min(val_errors)
    assert stopping.best_epoch == val_errors.index(min(val_errors))
    # the best epoch is not the last, so the restore did change the weights
    assert stopping.best_epoch < len(history.rows) - 1
    assert not states_equal(last.state, stopping.best_state)

    # The tutorial's rule replayed by hand on the logged history gives the same stop.
    patience, best, stop_epoch = 2 * batches, math.inf, None
    for row in history.rows:
        if row["val_error"] < best * 0.995:
            patience = max(patience, int(row["step"] * 2))
        best = min(best, row["val_error"])
        if row["step"] >= patience:
            stop_epoch = row["epoch"]
            break
    assert stop_epoch == history.rows[-1]["epoch"] < 19
    assert stopping.stopped_early and stopping.patience_steps == patience


# --- the early-stopping rule on a fake trainer ---------------------------------------------------


class FakeModule:
    """Stands in for a LightningModule: one weight; records what is loaded."""

    def __init__(self):
        self.w = torch.zeros(1)
        self.loaded = []

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.loaded.append({k: v.clone() for k, v in state.items()})
        self.w = state["w"].clone()


def run_rule(stopping: TutorialEarlyStopping, errors: list[float], n_batches: int = 5):
    """Feed one validation error per epoch; returns (patience after each epoch, stop epoch)."""
    trainer = SimpleNamespace(callback_metrics={}, global_step=0, current_epoch=0,
                              num_training_batches=n_batches, should_stop=False)
    module = FakeModule()
    stopping.on_train_start(trainer, module)
    patience, stopped_at = [stopping.patience_steps], None
    for epoch, error in enumerate(errors):
        trainer.current_epoch, trainer.global_step = epoch, n_batches * (epoch + 1)
        module.w = torch.tensor([float(epoch)])  # weights "after epoch e" hold e
        trainer.callback_metrics = {"val_error": torch.tensor(error)}
        stopping.on_train_epoch_end(trainer, module)
        patience.append(stopping.patience_steps)
        if trainer.should_stop:
            stopped_at = epoch
            break
    stopping.on_train_end(trainer, module)
    return patience, stopped_at, module


def test_tutorial_rule_patience_arithmetic_by_hand():
    # 5 batches per epoch, so the step after epoch e is 5(e+1); patience starts at 2 × 5 = 10.
    errors = [
        0.5,    # e0, step 5:  significant (< inf);  patience = max(10, 5·2)  = 10
        0.4,    # e1, step 10: 0.4 < 0.5·0.995;      patience = max(10, 10·2) = 20
        0.399,  # e2, step 15: < best, but > 0.4·0.995 = 0.398: best moves, patience stays 20
        0.45,   # e3, step 20: worse; 20 >= 20 -> stop here
        0.1,    # never seen
    ]
    stopping = TutorialEarlyStopping("val_error", rule="tutorial", patience_batches=2,
                                     patience_increase=2.0, improvement_threshold=0.995)
    patience, stopped_at, module = run_rule(stopping, errors)
    assert patience == [10, 10, 20, 20, 20]
    assert stopped_at == 3 and stopping.stopped_early
    # had e2 counted as significant, patience would be 30 and e3 would not stop
    assert stopping.best == pytest.approx(0.399) and stopping.best_epoch == 2
    # the weights of the best epoch come back
    assert len(module.loaded) == 1 and module.w.item() == 2.0


def test_tutorial_rule_keeps_going_while_improvements_extend_patience():
    # Each epoch improves by 10%: patience = 2·step stays ahead of the step, no stop.
    errors = [0.9 ** e for e in range(8)]
    stopping = TutorialEarlyStopping("val_error", patience_batches=1)
    patience, stopped_at, module = run_rule(stopping, errors, n_batches=4)
    assert patience == [4] + [max(4, 8 * (e + 1)) for e in range(8)]
    assert stopped_at is None and not stopping.stopped_early
    assert stopping.best_epoch == 7 and module.w.item() == 7.0


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
    stopping = TutorialEarlyStopping("val_error", rule="patience", patience_batches=0,
                                     patience_epochs=3)
    _, stopped_at, module = run_rule(stopping, errors)
    assert stopped_at == 5 and stopping.stopped_early
    assert stopping.best == pytest.approx(0.2986) and stopping.best_epoch == 4
    assert module.w.item() == 4.0


def test_rule_none_never_stops_but_restores_the_best():
    errors = [0.5, 0.2, 0.3, 0.4, 0.6]
    stopping = TutorialEarlyStopping("val_error", rule="none", patience_batches=0)
    _, stopped_at, module = run_rule(stopping, errors)
    assert stopped_at is None and not stopping.stopped_early
    assert stopping.summary() == {"best_val_error": pytest.approx(0.2), "best_epoch": 1,
                                  "stopped_early": False}
    assert module.w.item() == 1.0


def test_early_stopping_rejects_unknown_rule_and_missing_metric():
    with pytest.raises(ValueError, match="sometimes"):
        TutorialEarlyStopping("val_error", rule="sometimes")
    stopping = TutorialEarlyStopping("finetune/random/val_error")
    trainer = SimpleNamespace(callback_metrics={"finetune/random/val_loss": torch.tensor(1.0)},
                              global_step=5, current_epoch=0, num_training_batches=5,
                              should_stop=False)
    with pytest.raises(KeyError, match="finetune/random/val_error"):
        stopping.on_train_epoch_end(trainer, FakeModule())


def test_epoch_history_keeps_only_its_prefix_as_floats():
    history = EpochHistory("pretrain/layer_1")
    trainer = SimpleNamespace(current_epoch=3, global_step=40, callback_metrics={
        "pretrain/layer_1/recon_loss": torch.tensor(2.5),
        "pretrain/layer_1/val_recon_loss": torch.tensor(2.25),
        "pretrain/layer_12/recon_loss": torch.tensor(9.0),  # another layer: not ours
        "finetune/random/val_error": torch.tensor(0.1),
    })
    history.on_train_epoch_end(trainer, None)
    assert history.rows == [{"epoch": 3, "step": 40, "recon_loss": 2.5, "val_recon_loss": 2.25}]
    assert all(type(v) in (int, float) for v in history.rows[0].values())


# --- reproducibility ----------------------------------------------------------------------------


def train_tiny_classifier(order_seed: int) -> dict[str, torch.Tensor]:
    x, y = blobs(100, 7)
    clf = DeepClassifier.random_init(10, [8], 3, generator=gen(derive_seed(0, "random-init")))
    system = LitClassifier(clf, "random", SGD)
    cpu_trainer(2, []).fit(system, datamodule=TensorDataModule((x, y), (x, y), 10, order_seed))
    return snapshot(clf)


def test_same_seeds_give_bit_identical_weights_and_another_order_does_not():
    order = derive_seed(0, "finetune-order")
    a, b = train_tiny_classifier(order), train_tiny_classifier(order)
    c = train_tiny_classifier(derive_seed(1, "finetune-order"))
    assert states_equal(a, b)
    assert not torch.equal(a["hidden.0.linear.weight"], c["hidden.0.linear.weight"])
    initial = DeepClassifier.random_init(10, [8], 3, generator=gen(derive_seed(0, "random-init")))
    assert not torch.equal(a["hidden.0.linear.weight"], initial.hidden[0].W)


def train_tiny_dae(noise_seed: int, start_in_eval_mode: bool = False) -> dict[str, torch.Tensor]:
    x = prototype_data(100, 8)
    dae = DenoisingAutoencoder(N_VIS, 6, corruption_level=0.3, generator=gen(1))
    if start_in_eval_mode:
        dae.eval()  # e.g. after measuring its loss before training
    system = LitDenoisingAutoencoder(dae, layer=1, optimizer=SGD, seed=noise_seed)
    cpu_trainer(1, []).fit(system, datamodule=TensorDataModule((x,), None, 10, seed=2))
    return snapshot(dae)


def test_the_corruption_noise_is_seeded_by_the_system():
    a, b, c = train_tiny_dae(11), train_tiny_dae(11), train_tiny_dae(12)
    assert states_equal(a, b)
    assert not torch.equal(a["encoder.linear.weight"], c["encoder.linear.weight"])


def test_pretraining_corrupts_even_when_the_dae_arrives_in_eval_mode():
    """The system trains a *denoising* autoencoder whatever mode the module was left in.

    Lightning 2.x no longer calls ``.train()`` at the start of fit (it only warns), and
    ``DenoisingAutoencoder.forward`` corrupts only when ``self.training``: a DAE that was
    evaluated before being handed over would silently train as a plain autoencoder.
    """
    same = states_equal(train_tiny_dae(11, start_in_eval_mode=True), train_tiny_dae(11))
    assert same, "a DAE handed over in eval mode was trained without corruption"


# --- data order -----------------------------------------------------------------------------------


def test_every_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    n, b = 23, 5
    x = torch.arange(n)
    first, second = DeviceBatches((x, 2 * x), b, shuffle=True, seed=9), DeviceBatches(
        (x, 2 * x), b, shuffle=True, seed=9)
    assert len(first) == math.ceil(n / b) == 5
    epochs = []
    for epoch in range(3):
        batches = list(first)
        assert [len(xb) for xb, _ in batches] == [5, 5, 5, 5, 3]
        assert all(torch.equal(yb, 2 * xb) for xb, yb in batches)  # rows stay aligned
        order = torch.cat([xb for xb, _ in batches])
        assert torch.equal(order.sort().values, x)  # every index exactly once
        assert torch.equal(order, epoch_permutation(n, 9, epoch))
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # a second instance with the same seed replays the same sequence of epochs
    for epoch in range(3):
        assert torch.equal(torch.cat([xb for xb, _ in second]), epochs[epoch])
    other = DeviceBatches((x,), b, shuffle=True, seed=10)
    assert not torch.equal(torch.cat([xb for (xb,) in other]), epochs[0])


def test_an_unconsumed_iterator_does_not_advance_the_epoch():
    x = torch.arange(10)
    batches = DeviceBatches((x,), 4, shuffle=True, seed=1)
    iter(batches)  # e.g. an "is it iterable?" probe
    assert torch.equal(torch.cat([xb for (xb,) in batches]), epoch_permutation(10, 1, 0))


def test_no_shuffle_yields_contiguous_slices_every_time():
    x = torch.arange(23) * 10
    batches = DeviceBatches((x,), 5, shuffle=False)
    for _ in range(2):
        got = [xb for (xb,) in batches]
        assert len(got) == len(batches) == 5
        for i, xb in enumerate(got):
            assert torch.equal(xb, x[5 * i: 5 * i + 5])


def test_device_batches_reject_tensors_of_different_lengths():
    with pytest.raises(ValueError, match="same first dimension"):
        DeviceBatches((torch.zeros(4), torch.zeros(5)), 2, shuffle=False)


def test_tensor_datamodule_serves_seeded_training_and_ordered_validation():
    x, y = torch.arange(12.0), torch.arange(12)
    dm = TensorDataModule((x, y), (x, y), batch_size=5, seed=4, eval_batch_size=100)
    train = dm.train_dataloader()
    assert train.batches.shuffle and train.batches.seed == 4
    assert train.steps_per_epoch == 3 and train.steps_per_batch == 1024 // 5 and len(train) == 1
    (xv, yv), = list(dm.val_dataloader())
    assert torch.equal(xv, x) and torch.equal(yv, y)
    assert TensorDataModule((x,), None, 5, 0).val_dataloader() == []


def test_chunks_group_consecutive_minibatches_in_order():
    x = torch.arange(23)
    chunks = ChunkedBatches(DeviceBatches((x,), 5, shuffle=True, seed=3), steps_per_batch=2)
    assert len(chunks) == 3 and chunks.steps_per_epoch == 5
    got = list(chunks)
    assert [len(c) for c in got] == [2, 2, 1]
    assert torch.equal(torch.cat([xb for c in got for (xb,) in c]), epoch_permutation(23, 3, 0))
    assert default_steps_per_batch(1) == 1024 and default_steps_per_batch(20) == 51
    assert default_steps_per_batch(256) == 4 and default_steps_per_batch(5000) == 1
    with pytest.raises(ValueError, match="at least 1"):
        ChunkedBatches(DeviceBatches((x,), 5, shuffle=False), 0)


@pytest.mark.parametrize("kind", ["dae", "classifier"])
def test_chunked_training_equals_one_minibatch_per_step(kind):
    """The same steps in the same order: bit-identical weights, history and global step."""
    x = prototype_data(60, 4)
    y = torch.arange(60) % 3

    def train(steps_per_batch):
        if kind == "dae":
            model = DenoisingAutoencoder(N_VIS, 6, corruption_level=0.2, generator=gen(2))
            system = LitDenoisingAutoencoder(model, layer=1, optimizer=SGD, seed=1)
            tensors = (x,)
        else:
            model = DeepClassifier.random_init(N_VIS, [6], 3, generator=gen(2))
            system = LitClassifier(model, "random", SGD)
            tensors = (x, y)
        history = EpochHistory(system.prefix)
        trainer = cpu_trainer(2, [history])
        trainer.fit(system, datamodule=TensorDataModule(tensors, tensors, 7, seed=5,
                                                       steps_per_batch=steps_per_batch))
        return model.state_dict(), history.rows, trainer.global_step

    one, many = train(1), train(4)
    assert one[2] == many[2] == 2 * math.ceil(60 / 7)
    assert one[1] == many[1]
    assert all(torch.equal(one[0][k], many[0][k]) for k in one[0])


# --- divergence -----------------------------------------------------------------------------------

MESSAGE = re.compile(r"^(?P<prefix>\S+): loss became (?P<value>\S+) at epoch (?P<epoch>\d+), "
                     r"step (?P<step>\d+)\. ")


def test_an_infinite_input_stops_pretraining_at_the_first_step():
    x = prototype_data(40, 3)
    x[:, 0] = math.inf  # every batch holds an inf
    dae = DenoisingAutoencoder(N_VIS, 5, corruption_level=0.1, generator=gen(1))
    system = LitDenoisingAutoencoder(dae, layer=2, optimizer=SGD, seed=0)
    with pytest.raises(FloatingPointError) as info:
        cpu_trainer(3, []).fit(system, datamodule=TensorDataModule((x,), None, 10, seed=0))
    m = MESSAGE.match(str(info.value))
    assert m, str(info.value)
    assert m["prefix"] == "pretrain/layer_2"
    assert (m["epoch"], m["step"]) == ("0", "0")
    assert not math.isfinite(float(m["value"]))
    assert "pretrain.optimizer.lr" in str(info.value)


@pytest.mark.parametrize("every_step", [True, False])
def test_the_first_non_finite_step_is_named_whether_checked_at_once_or_per_chunk(every_step):
    """On an accelerator the losses of a chunk are checked together (one device wait,
    ``FiniteGuard``); the error must still name the step whose batch first holds the inf,
    not the chunk's last step. Forced here on the CPU with ``every_step=False``."""
    x = prototype_data(40, 3)
    x[17, 0] = math.inf  # one bad example: its batch, and every step after it, is non-finite
    expected = int((epoch_permutation(40, 0, 0) == 17).nonzero()) // 5  # batch 5: 8 steps
    assert 0 < expected < 7  # mid-chunk, so a chunk-end check would name the wrong step
    dae = DenoisingAutoencoder(N_VIS, 5, corruption_level=0.1, generator=gen(1))
    system = LitDenoisingAutoencoder(dae, layer=1, optimizer=SGD, seed=0)
    system.finite.every_step = every_step
    with pytest.raises(FloatingPointError) as info:
        cpu_trainer(2, []).fit(system, datamodule=TensorDataModule(
            (x,), None, 5, seed=0, steps_per_batch=8))  # the whole epoch is one chunk
    m = MESSAGE.match(str(info.value))
    assert m, str(info.value)
    assert (m["prefix"], m["epoch"], m["step"]) == ("pretrain/layer_1", "0", str(expected))
    assert "pretrain.optimizer.lr" in str(info.value)
    assert system.finite._pending == []  # nothing left over for a later chunk


def test_a_huge_learning_rate_is_reported_at_the_step_it_diverges():
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

    system = LitClassifier(fresh(), "random", {"name": "sgd", "lr": lr})
    with pytest.raises(FloatingPointError) as info:
        cpu_trainer(50, []).fit(system, datamodule=TensorDataModule((x, y), None, 50, seed=6))
    m = MESSAGE.match(str(info.value))
    assert m, str(info.value)
    assert m["prefix"] == "finetune/random"
    assert int(m["epoch"]) == int(m["step"]) == expected_step
    assert "finetune.optimizer.lr" in str(info.value)
