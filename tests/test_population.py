"""The training engine: a single run is a population of one, and member p of a population
is its own run at P = 1.

Checked two ways: a population of one (the engine's single run) against a plain PyTorch
loop written here (autograd, ``torch.optim``, the seeded data order, noise and dropout
drawn from the global or the member's generator), which shows that the engine draws the
noise, the dropout masks and the data order in the order a plain run does; and member p of
P against the same engine at P = 1. In float64 the match is to 1e-12, in float32 to 1e-5
(a batched matmul sums in another order than a single one).
"""

from __future__ import annotations

import pytest
import torch

from torch.nn import functional as F

from config.stages import RuntimeConfig
from models.classifier import DeepClassifier
from models.dae import DenoisingAutoencoder
from training.stopping_rules import stopping_rule
from training.batches import epoch_permutation
from training.classifier_population import ClassifierPopulation
from training.classifier_training import train_classifier_population
from training.dae_training import train_dae_population
from training.population import DAEPopulation
from training.stopping_rules import EarlyStopping
from training.trainer import make_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's advice on CPU

SGD = {"name": "sgd", "lr": 0.1}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one intra-op thread. Two threads on a busy 2-core machine make every
    small kernel wait at OpenMP barriers (measured here: 20-40x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cpu_trainer(epochs: int):
    """A stage's trainer on the CPU in float32, for ``epochs`` epochs (one per fit)."""
    return make_trainer(RuntimeConfig(accelerator="cpu", precision="32-true"), epochs)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def histories_close(a: list[dict], b: list[dict], rel: float) -> None:
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            assert row_a[key] == pytest.approx(row_b[key], rel=rel, abs=rel), key


# --- pretraining -------------------------------------------------------------------------------


def make_dae(seed: int, dtype=torch.float64, **kwargs) -> DenoisingAutoencoder:
    kwargs = {"corruption_level": 0.3, **kwargs}
    return DenoisingAutoencoder(20, 7, generator=gen(100 + seed), **kwargs).to(dtype)


def train_dae_alone(dae, x, noise_seed, order_seed, epochs, batch_size, optimizer,
                    x_valid=None):
    """The plain loop: member's own generator, one corrupt() per step, the seeded order.
    Returns the final state and the per-epoch rows (batch-weighted mean training loss,
    clean validation loss over the whole set at once)."""
    g = torch.Generator().manual_seed(noise_seed)
    opt = (torch.optim.SGD(dae.parameters(), lr=optimizer["lr"],
                           momentum=optimizer.get("momentum", 0.0))
           if optimizer["name"] == "sgd" else torch.optim.Adam(dae.parameters(), lr=optimizer["lr"]))
    rows, step = [], 0
    for epoch in range(epochs):
        dae.train()
        order, total = epoch_permutation(len(x), order_seed, epoch), 0.0
        for start in range(0, len(x), batch_size):
            xb = x[order[start : start + batch_size]]
            loss = dae.reconstruction_loss(xb, dae.decoder_logits(dae.encode(dae.corrupt(xb, g))))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, step = total + loss.item() * len(xb), step + 1
        row = {"epoch": epoch, "step": step, "recon_loss": total / len(x)}
        if x_valid is not None:
            with torch.no_grad():
                row["val_recon_loss"] = dae.eval()(x_valid).item()
        rows.append(row)
    return dae.state_dict(), rows


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_a_dae_population_of_one_equals_an_autograd_loop(dtype, tol):
    """P = 1, the engine's single run (fused SGD steps, Lightning's epochs, chunked batches,
    validation in chunks of 16) is the plain loop: weights and every history row."""
    g = gen(0)
    x, x_valid = (torch.rand(n, 20, generator=g, dtype=dtype) for n in (103, 50))
    result = train_dae_population([make_dae(0, dtype)], x, x_valid, noise_seeds=[10],
                                  order_seeds=[20], batch_size=10, optimizer=SGD,
                                  eval_batch_size=16, trainer=cpu_trainer(2))
    state, rows = train_dae_alone(make_dae(0, dtype), x, 10, 20, 2, 10, SGD, x_valid)
    assert max_diff(result.states[0], state) < tol
    histories_close(result.histories[0], rows, rel=max(tol, 1e-6))
    # 103 examples, batch 10: 11 steps per epoch, the last one of 3 examples
    assert [r["step"] for r in result.histories[0]] == [11, 22]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_each_dae_member_equals_its_run_at_population_one(dtype, tol):
    g = gen(0)
    x, x_valid = (torch.rand(n, 20, generator=g, dtype=dtype) for n in (103, 50))
    seeds = [0, 1, 2]
    kwargs = dict(batch_size=10, optimizer=SGD, eval_batch_size=16)
    result = train_dae_population([make_dae(s, dtype) for s in seeds], x, x_valid,
                                  noise_seeds=[10 + s for s in seeds],
                                  order_seeds=[20 + s for s in seeds], trainer=cpu_trainer(2),
                                  **kwargs)
    for s in seeds:
        alone = train_dae_population([make_dae(s, dtype)], x, x_valid, noise_seeds=[10 + s],
                                     order_seeds=[20 + s], trainer=cpu_trainer(2), **kwargs)
        assert max_diff(result.states[s], alone.states[0]) < tol
        histories_close(result.histories[s], alone.histories[0], rel=max(tol, 1e-6))
    # the members really differ (different init, noise and order)
    assert max_diff(result.states[0], result.states[1]) > 0.01


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_untied_dae_members_with_their_own_inputs_equal_a_plain_loop(dtype, tol):
    """Layer k > 1: every member trains on its own codes, (P, N, D); untied, momentum,
    salt-and-pepper noise with a per-member value range."""
    P, g = 3, gen(1)
    codes = torch.rand(P, 64, 20, generator=g, dtype=dtype)  # (P, N, D)
    ranges = [(float(c.min()), float(c.max())) for c in codes]
    opt = {"name": "sgd", "lr": 0.05, "momentum": 0.9}

    def member(s):
        return make_dae(s, dtype, tied=False, noise="salt_and_pepper", loss="squared_error",
                        value_range=ranges[s])

    result = train_dae_population([member(s) for s in range(P)], codes, codes,
                                  noise_seeds=[7, 8, 9], order_seeds=[4, 5, 6], batch_size=8,
                                  optimizer=opt, trainer=cpu_trainer(3))
    for s in range(P):
        alone, _ = train_dae_alone(member(s), codes[s], 7 + s, 4 + s, 3, 8, opt)
        assert set(alone) == {"encoder.linear.weight", "encoder.linear.bias", "b_prime",
                              "W_prime"}
        assert max_diff(result.states[s], alone) < tol
        # the returned state loads into the single module
        DenoisingAutoencoder(20, 7, tied=False).to(dtype).load_state_dict(result.states[s])


@pytest.mark.parametrize("activation, loss, tied", [
    ("sigmoid", "cross_entropy", True), ("sigmoid", "cross_entropy", False),
    ("tanh", "squared_error", True), ("relu", "squared_error", False),
    ("leaky_relu", "squared_error", True),
])
def test_the_fused_sgd_step_equals_autograd_with_torch_optim(activation, loss, tied):
    """``DAEPopulation.sgd_step`` (gradients by hand, update fused into the matmuls) is the
    autograd + ``torch.optim.SGD`` step, for every activation, loss and decoder."""
    x = torch.rand(40, 20, generator=gen(9), dtype=torch.float64)

    def members():
        return [make_dae(s, torch.float64, activation=activation, loss=loss, tied=tied)
                for s in range(3)]

    kwargs = dict(noise_seeds=[1, 2, 3], order_seeds=[4, 5, 6], batch_size=8, optimizer=SGD)
    fused = train_dae_population(members(), x, x, fused=True, trainer=cpu_trainer(2), **kwargs)
    autograd = train_dae_population(members(), x, x, fused=False, trainer=cpu_trainer(2),
                                    **kwargs)
    for a, b, initial in zip(fused.states, autograd.states, members()):
        assert max_diff(a, b) < 1e-9  # float64 rounding, summed in another order
        assert max_diff(a, initial.state_dict()) > 1e-3  # it did train
    for a, b in zip(fused.histories, autograd.histories):
        histories_close(a, b, rel=1e-9)
    with pytest.raises(ValueError, match="plain SGD"):
        train_dae_population(members(), x, None, fused=True, trainer=cpu_trainer(2), **{
            **kwargs, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}})


def test_the_population_loss_is_the_sum_of_each_members_own_mean_loss():
    """Member p's gradient is the single model's gradient, not 1/P of it."""
    P, g = 4, gen(2)
    daes = [make_dae(s, torch.float64) for s in range(P)]
    pop = DAEPopulation(daes)
    x = torch.rand(P, 5, 20, generator=g, dtype=torch.float64)
    x_tilde = pop.corrupt(x, [gen(30 + p) for p in range(P)])
    losses = pop.reconstruction_loss(x, pop.decoder_logits(pop.encode(x_tilde)))
    losses.sum().backward()
    for p, dae in enumerate(daes):
        # the same noise, drawn by the single module from the same generator
        assert torch.equal(x_tilde[p], dae.corrupt(x[p], gen(30 + p)))
        single = dae.reconstruction_loss(x[p], dae.decoder_logits(dae.encode(x_tilde[p])))
        assert losses[p].item() == pytest.approx(single.item(), rel=1e-13)
        single.backward()
        assert torch.allclose(pop.W.grad[p], dae.encoder.W.grad, rtol=1e-12, atol=1e-14)
        assert torch.allclose(pop.b_prime.grad[p], dae.b_prime.grad, rtol=1e-12, atol=1e-14)
    # by hand, member 0: cross-entropy summed over pixels, averaged over the 5 examples
    a = pop.decoder_logits(pop.encode(x_tilde))[0]
    z = torch.sigmoid(a)
    by_hand = -(x[0] * z.log() + (1 - x[0]) * (1 - z).log()).sum(dim=1).mean()
    assert losses[0].item() == pytest.approx(by_hand.item(), rel=1e-10)


def test_a_population_of_one_equals_the_single_run():
    x = torch.rand(40, 20, generator=gen(3))
    result = train_dae_population([make_dae(0, torch.float32)], x, None, noise_seeds=[1],
                                  order_seeds=[2], batch_size=6, optimizer=SGD,
                                  trainer=cpu_trainer(2))
    alone, _ = train_dae_alone(make_dae(0, torch.float32), x, 1, 2, 2, 6, SGD)
    assert max_diff(result.states[0], alone) < 1e-6
    assert [r["step"] for r in result.histories[0]] == [7, 14]
    assert "val_recon_loss" not in result.histories[0][0]


def test_populations_reject_members_that_differ_in_more_than_seed():
    with pytest.raises(ValueError, match="corruption_level"):
        DAEPopulation([make_dae(0, corruption_level=0.1), make_dae(1, corruption_level=0.2)])
    with pytest.raises(ValueError, match="layer shapes"):
        ClassifierPopulation([DeepClassifier.random_init(10, [8], 3),
                              DeepClassifier.random_init(10, [9], 3)])
    with pytest.raises(ValueError, match="2 seeds for 3 members"):
        train_dae_population([make_dae(s) for s in range(3)], torch.rand(9, 20), None,
                             noise_seeds=[1, 2], order_seeds=[1, 2, 3], batch_size=3,
                             optimizer=SGD, trainer=cpu_trainer(1))


# --- fine-tuning ---------------------------------------------------------------------------------

C = 3


def blobs(n: int, g: torch.Generator, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Three overlapping Gaussian classes in 10-D: validation error falls, then wobbles."""
    centers = 3 * torch.randn(C, 10, generator=gen(0), dtype=dtype)
    y = torch.randint(0, C, (n,), generator=g)
    return centers[y] + 2.5 * torch.randn(n, 10, generator=g, dtype=dtype), y


def make_classifier(seed: int, dtype, dropout: float = 0.0) -> DeepClassifier:
    return DeepClassifier.random_init(10, [8, 6], C, dropout=dropout,
                                      generator=gen(100 + seed)).to(dtype)


def finetune_alone(clf, data, order_seed, dropout_seed, max_epochs, batch_size, optimizer,
                   stopping: EarlyStopping):
    """The plain loop: autograd, ``torch.optim``, dropout from the seeded global RNG, the
    seeded order, the stopping rule after each epoch and the best weights at the end."""
    (x, y), (x_valid, y_valid) = data
    opt = torch.optim.SGD(clf.parameters(), lr=optimizer["lr"],
                          momentum=optimizer.get("momentum", 0.0))
    torch.manual_seed(dropout_seed)
    rows, step, best = [], 0, None
    for epoch in range(max_epochs):
        clf.train()
        order, sums = epoch_permutation(len(x), order_seed, epoch), torch.zeros(2)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            logits = clf(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            error = (logits.argmax(dim=1) != y[idx]).double().mean()
            sums, step = sums + torch.stack([loss.detach().double(), error]) * len(idx), step + 1
        with torch.no_grad():
            logits = clf.eval()(x_valid)
            val = (F.cross_entropy(logits, y_valid).item(),
                   (logits.argmax(dim=1) != y_valid).double().mean().item())
        rows.append({"epoch": epoch, "step": step, "train_loss": sums[0].item() / len(x),
                     "train_error": sums[1].item() / len(x), "val_loss": val[0],
                     "val_error": val[1]})
        is_best, stop = stopping.update(val[1], step=step, epoch=epoch)
        if is_best:
            best = {k: v.clone() for k, v in clf.state_dict().items()}
        if stop:
            break
    return best, rows


@pytest.mark.parametrize(
    "dtype, tol, dropout, rule",
    [(torch.float64, 1e-12, 0.0, "tutorial"), (torch.float32, 1e-5, 0.2, "patience")],
)
def test_a_classifier_population_of_one_equals_an_autograd_loop(dtype, tol, dropout, rule):
    g = gen(4)
    data = blobs(200, g, dtype), blobs(150, g, dtype)
    opt = {"name": "sgd", "lr": 0.3, "momentum": 0.5}
    stopped = []
    for s in range(4):
        result = train_classifier_population(
            [make_classifier(s, dtype, dropout)], *data[0], *data[1], order_seeds=[20 + s],
            dropout_seeds=[30 + s], batch_size=16, optimizer=opt, eval_batch_size=64,
            stopping=stopping_rule(rule, patience_batches=2, patience_epochs=2),
            trainer=cpu_trainer(15))
        stopping = EarlyStopping(rule, steps_per_epoch=13, patience_batches=2,
                                 patience_epochs=2)
        state, rows = finetune_alone(make_classifier(s, dtype, dropout), data, 20 + s, 30 + s,
                                     15, 16, opt, stopping)
        assert max_diff(result.states[0], state) < tol
        histories_close(result.histories[0], rows, rel=max(tol, 1e-6))
        assert (result.best_epoch[0], result.stopped_early[0]) == (
            stopping.best_epoch, stopping.stopped_early)
        assert result.best_val_error[0] == pytest.approx(stopping.best, rel=1e-6)
        stopped.append(len(rows) < 15)
    assert any(stopped)  # the rule really stopped a run


@pytest.mark.parametrize(
    "dtype, tol, dropout, rule",
    [(torch.float64, 1e-12, 0.0, "tutorial"), (torch.float32, 1e-5, 0.2, "patience")],
)
def test_each_classifier_member_equals_its_run_at_population_one(dtype, tol, dropout, rule):
    g = gen(4)
    (x, y), (x_valid, y_valid) = blobs(200, g, dtype), blobs(150, g, dtype)
    opt = {"name": "sgd", "lr": 0.3, "momentum": 0.5}
    kwargs = dict(batch_size=16, optimizer=opt, eval_batch_size=64,
                  stopping=stopping_rule(rule, patience_batches=2, patience_epochs=2))
    seeds = [0, 1, 2, 3]
    result = train_classifier_population(
        [make_classifier(s, dtype, dropout) for s in seeds], x, y, x_valid, y_valid,
        order_seeds=[20 + s for s in seeds], dropout_seeds=[30 + s for s in seeds],
        trainer=cpu_trainer(15), **kwargs)
    for s in seeds:
        alone = train_classifier_population(
            [make_classifier(s, dtype, dropout)], x, y, x_valid, y_valid,
            order_seeds=[20 + s], dropout_seeds=[30 + s], trainer=cpu_trainer(15), **kwargs)
        assert max_diff(result.states[s], alone.states[0]) < tol
        histories_close(result.histories[s], alone.histories[0], rel=1e-6)
        assert (result.best_epoch[s], result.stopped_early[s]) == (
            alone.best_epoch[0], alone.stopped_early[0])
    # the members stopped at different epochs: early stopping really is per member
    assert len({len(h) for h in result.histories}) > 1


@pytest.mark.parametrize("activation, dropout", [
    ("sigmoid", 0.0), ("sigmoid", 0.3), ("tanh", 0.0), ("relu", 0.2), ("leaky_relu", 0.0),
])
def test_the_fused_classifier_sgd_step_equals_autograd_with_torch_optim(activation, dropout):
    """``ClassifierPopulation.sgd_step`` (backpropagation by hand, updates fused into the
    matmuls) is the autograd + ``torch.optim.SGD`` step, dropout masks included, and so
    is everything early stopping decides from it."""
    dtype, g = torch.float64, gen(7)
    (x, y), (x_valid, y_valid) = blobs(120, g, dtype), blobs(60, g, dtype)

    def members():
        return [DeepClassifier.random_init(10, [8, 6], C, activation=activation,
                                           dropout=dropout, generator=gen(100 + s)).to(dtype)
                for s in range(3)]

    kwargs = dict(order_seeds=[1, 2, 3], dropout_seeds=[4, 5, 6], batch_size=16,
                  optimizer={"name": "sgd", "lr": 0.3},
                  stopping=stopping_rule("patience", patience_epochs=2), eval_batch_size=32)
    fused = train_classifier_population(members(), x, y, x_valid, y_valid, fused=True,
                                        trainer=cpu_trainer(6), **kwargs)
    autograd = train_classifier_population(members(), x, y, x_valid, y_valid, fused=False,
                                           trainer=cpu_trainer(6), **kwargs)
    for a, b, initial in zip(fused.states, autograd.states, members()):
        assert max_diff(a, b) < 1e-9  # float64 rounding, summed in another order
        assert max_diff(a, initial.state_dict()) > 1e-3  # it did train
    for a, b in zip(fused.histories, autograd.histories):
        histories_close(a, b, rel=1e-9)
    assert fused.best_epoch == autograd.best_epoch
    assert fused.stopped_early == autograd.stopped_early
    with pytest.raises(ValueError, match="plain SGD"):
        train_classifier_population(members(), x, y, x_valid, y_valid, fused=True,
                                    trainer=cpu_trainer(6),
                                    **{**kwargs, "optimizer": {"name": "adam", "lr": 0.01}})


def test_the_fused_classifier_step_by_hand_on_one_example():
    """One member, one example, a 2-2-2 sigmoid network: the loss and every updated weight
    against the chain rule written out with numbers."""
    clf = DeepClassifier.random_init(2, [2], 2).to(torch.float64)
    W = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    V = torch.tensor([[1.0, -0.5], [-1.5, 2.0]], dtype=torch.float64)
    with torch.no_grad():
        clf.hidden[0].linear.weight.copy_(W)
        clf.hidden[0].linear.bias.copy_(torch.tensor([0.1, -0.2], dtype=torch.float64))
        clf.output.weight.copy_(V)
        clf.output.bias.copy_(torch.tensor([0.3, 0.0], dtype=torch.float64))
    pop = ClassifierPopulation([clf]).train()
    x = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)  # (P=1, B=1, 2)
    loss, _ = pop.sgd_step(x, torch.tensor([[1]]), lr=0.5)
    # h = sigmoid(W x + b) = sigmoid([-1.4, 2.3]); o = V h + c; L = -log softmax(o)_1
    h = torch.sigmoid(torch.tensor([-1.4, 2.3], dtype=torch.float64))
    o = V @ h + torch.tensor([0.3, 0.0], dtype=torch.float64)
    p1 = torch.exp(o[1]) / torch.exp(o).sum()
    assert loss.item() == pytest.approx(-torch.log(p1).item(), rel=1e-12)
    do = torch.stack([1 - p1, p1 - 1])  # softmax - onehot(1)
    dpre = (V.t() @ do) * h * (1 - h)
    assert torch.allclose(pop.out_weight[0], V - 0.5 * torch.outer(do, h), atol=1e-14)
    assert torch.allclose(pop.out_bias[0], torch.tensor([0.3, 0.0], dtype=torch.float64)
                          - 0.5 * do, atol=1e-14)
    assert torch.allclose(pop.weights[0][0], W - 0.5 * torch.outer(dpre, x[0, 0]), atol=1e-14)
    assert torch.allclose(pop.biases[0][0], torch.tensor([0.1, -0.2], dtype=torch.float64)
                          - 0.5 * dpre, atol=1e-14)


def test_a_stopped_member_keeps_its_best_weights_while_the_others_go_on():
    dtype, g = torch.float32, gen(5)
    (x, y), (x_valid, y_valid) = blobs(200, g, dtype), blobs(150, g, dtype)
    adam = {"name": "adam", "lr": 0.05}
    kwargs = dict(x_train=x, y_train=y, x_valid=x_valid, y_valid=y_valid, batch_size=16,
                  optimizer=adam,
                  stopping=stopping_rule("patience", patience_epochs=2))
    seeds = list(range(4))
    together = train_classifier_population([make_classifier(s, dtype) for s in seeds],
                                           order_seeds=[50 + s for s in seeds],
                                           trainer=cpu_trainer(12), **kwargs)
    runs = [len(h) for h in together.histories]
    assert min(runs) < max(runs), runs  # some stopped while others went on
    for s in seeds:
        # alone (a population of one) gives the same member: dropping the others from the
        # batch, Adam state and all, does not disturb it
        alone = train_classifier_population([make_classifier(s, dtype)], order_seeds=[50 + s],
                                            trainer=cpu_trainer(12), **kwargs)
        assert max_diff(together.states[s], alone.states[0]) < 1e-5
        assert len(alone.histories[0]) == runs[s]
        # the returned weights are the best epoch's, not the last epoch's
        clf = make_classifier(s, dtype)
        clf.load_state_dict(together.states[s])
        with torch.no_grad():
            error = (clf.eval()(x_valid).argmax(dim=1) != y_valid).float().mean().item()
        val_errors = [row["val_error"] for row in together.histories[s]]
        assert error == pytest.approx(min(val_errors), abs=1e-6)
        assert together.best_epoch[s] == val_errors.index(min(val_errors))
    stopped = [s for s in seeds if together.stopped_early[s]]
    assert any(together.best_epoch[s] < runs[s] - 1 for s in stopped)  # a restore mattered


def test_dropout_needs_a_generator_per_member():
    clfs = [make_classifier(s, torch.float32, dropout=0.5) for s in range(2)]
    x, y = blobs(20, gen(6), torch.float32)
    with pytest.raises(ValueError, match="dropout_seeds"):
        train_classifier_population(clfs, x, y, x, y, order_seeds=[1, 2], batch_size=5,
                                    optimizer=SGD, trainer=cpu_trainer(1))
    pop = ClassifierPopulation(clfs).train()
    with pytest.raises(ValueError, match="one generator per member"):
        pop(x)


def test_the_twins_fine_tuned_as_one_population_equal_each_arm_alone(tmp_path):
    """The pipeline's fine-tuning stage: the pretrained and random arms of one seed as a
    population of two give each arm's single run, and they share their data order."""
    from types import SimpleNamespace

    from config.stages import PipelineConfig
    from tasks.finetune import ARMS, finetune, finetune_members

    config = PipelineConfig.model_validate({
        "model": {"hidden_sizes": [8, 6], "dropout": 0.2},
        "pretrain": {"corruption_levels": [0.1, 0.2]},
        "finetune": {"max_epochs": 4, "batch_size": 16, "early_stopping": "patience",
                     "patience_epochs": 1, "optimizer": {"name": "sgd", "lr": 0.3}},
        "runtime": {"accelerator": "cpu", "seed": 3}})
    g = gen(8)
    (x, y), (xv, yv) = blobs(120, g, torch.float32), blobs(60, g, torch.float32)
    data = SimpleNamespace(x_train=x, y_train=y, x_valid=xv, y_valid=yv, n_features=10,
                           n_classes=C)
    encoders = [layer.state_dict() for layer in make_classifier(9, torch.float32).hidden]
    states = {"pretrained": encoders, "random": None}
    twins = finetune_members(ARMS, [config, config], data, [states[a] for a in ARMS],
                             [tmp_path / f"{a}.safetensors" for a in ARMS])
    assert twins[0].initial_hidden_sha256 != twins[1].initial_hidden_sha256
    for arm, together in zip(ARMS, twins):
        alone = finetune(arm, config, data, states[arm], tmp_path / arm)
        assert together.arm == alone.arm == arm
        histories_close(together.history, alone.history, rel=1e-6)
        assert together.best_epoch == alone.best_epoch
        assert together.initial_hidden_sha256 == alone.initial_hidden_sha256
    with pytest.raises(ValueError, match="distinct"):
        finetune_members(["random", "random"], [config, config], data, [None, None],
                         [tmp_path / "a", tmp_path / "b"])
