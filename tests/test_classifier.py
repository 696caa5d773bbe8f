"""The deep classifier: its hidden layers *are* the autoencoders' encoders (docs/design.md §2).

Sharing is checked by identity and storage, and by optimiser steps in both directions whose
effect is predicted exactly (W ← W − lr·∇W). Loading pretrained states copies them;
``random_init`` gives the same architecture with fresh, seed-determined weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from models.classifier import DeepClassifier
from models.dae import DenoisingAutoencoder
from models.layers import EncoderLayer

SIZES = [12, 8, 5]  # n_visible, then two hidden layers
N_CLASSES = 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def stacked_daes() -> list[DenoisingAutoencoder]:
    return [
        DenoisingAutoencoder(SIZES[k], SIZES[k + 1], corruption_level=0.2, generator=gen(k))
        .double()
        for k in range(len(SIZES) - 1)
    ]


def data(seed: int = 0, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, SIZES[0], generator=gen(seed), dtype=torch.float64)
    y = torch.randint(0, N_CLASSES, (n,), generator=gen(seed + 1))
    return x, y


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_hidden_layers_are_the_encoders_themselves():
    daes = stacked_daes()
    clf = DeepClassifier(hidden=[d.encoder for d in daes], n_classes=N_CLASSES).double()
    for k, dae in enumerate(daes):
        assert clf.hidden[k] is dae.encoder
        assert clf.hidden[k].W.data_ptr() == dae.encoder.W.data_ptr()
        assert clf.hidden[k].linear.bias.data_ptr() == dae.encoder.linear.bias.data_ptr()
    assert clf.output.weight.shape == (N_CLASSES, SIZES[-1])
    assert torch.all(clf.output.weight == 0) and torch.all(clf.output.bias == 0)


@pytest.mark.parametrize("k", [0, 1])
def test_a_step_on_autoencoder_k_moves_classifier_layer_k_identically(k):
    daes = stacked_daes()
    clf = DeepClassifier(hidden=[d.encoder for d in daes], n_classes=N_CLASSES).double()
    x, _ = data()
    with torch.no_grad():
        codes = x if k == 0 else daes[0].encode(x)  # layer k trains on the clean codes below
    before = snapshot(clf)
    lr = 0.5
    opt = torch.optim.SGD(daes[k].parameters(), lr=lr)
    daes[k](codes, generator=gen(9)).backward()
    grad_W = daes[k].encoder.W.grad.clone()
    grad_b = daes[k].encoder.linear.bias.grad.clone()
    assert grad_W.abs().max() > 0
    opt.step()

    after = snapshot(clf)
    w_key, b_key = f"hidden.{k}.linear.weight", f"hidden.{k}.linear.bias"
    assert torch.equal(after[w_key], before[w_key].add(grad_W, alpha=-lr))
    assert torch.equal(after[b_key], before[b_key].add(grad_b, alpha=-lr))
    for key in before:  # nothing else in the classifier moved
        if key not in (w_key, b_key):
            assert torch.equal(after[key], before[key]), key
    # and the classifier computes with the new weights
    h = x
    for layer_k in range(len(daes)):
        W = after[f"hidden.{layer_k}.linear.weight"]
        h = torch.sigmoid(h @ W.t() + after[f"hidden.{layer_k}.linear.bias"])
    assert torch.allclose(clf.features(x), h, rtol=0, atol=1e-14)


def test_a_classifier_step_moves_the_autoencoders_encoders():
    daes = stacked_daes()
    clf = DeepClassifier(hidden=[d.encoder for d in daes], n_classes=N_CLASSES).double()
    with torch.no_grad():  # a non-zero output layer, so the error reaches the hidden layers
        clf.output.weight.copy_(torch.randn(N_CLASSES, SIZES[-1], generator=gen(3),
                                            dtype=torch.float64))
    x, y = data()
    before = [snapshot(d) for d in daes]
    dae_loss_before = daes[1].eval()(daes[0].encode(x)).item()
    lr = 0.5
    opt = torch.optim.SGD(clf.parameters(), lr=lr)
    F.cross_entropy(clf(x), y).backward()
    grads = [(layer.W.grad.clone(), layer.linear.bias.grad.clone()) for layer in clf.hidden]
    opt.step()
    for k, dae in enumerate(daes):
        g_W, g_b = grads[k]
        assert g_W.abs().max() > 0
        assert torch.equal(dae.encoder.W, before[k]["encoder.linear.weight"].add(g_W, alpha=-lr))
        assert torch.equal(dae.encoder.linear.bias,
                           before[k]["encoder.linear.bias"].add(g_b, alpha=-lr))
        assert torch.equal(dae.b_prime, before[k]["b_prime"])  # not part of the classifier
    assert daes[1](daes[0].encode(x)).item() != dae_loss_before


def test_the_zero_output_layer_blocks_the_first_hidden_gradient():
    """Both twins start with V = 0 (the tutorial's LogisticRegression), so the first step
    only moves the output layer: dL/dh = Vᵀ(p − y) = 0."""
    clf = DeepClassifier.random_init(SIZES[0], SIZES[1:], N_CLASSES, generator=gen(0)).double()
    x, y = data()
    F.cross_entropy(clf(x), y).backward()
    for layer in clf.hidden:
        assert torch.all(layer.W.grad == 0)
    assert clf.output.weight.grad.abs().max() > 0


def encoder_states(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = gen(seed)
    return [
        {"linear.weight": torch.randn(SIZES[k + 1], SIZES[k], generator=g),
         "linear.bias": torch.randn(SIZES[k + 1], generator=g)}
        for k in range(len(SIZES) - 1)
    ]


def test_from_encoder_states_loads_copies_of_exactly_the_given_tensors():
    states = encoder_states()
    clf = DeepClassifier.from_encoder_states(states, N_CLASSES)
    assert len(clf.hidden) == 2
    for k, (layer, state) in enumerate(zip(clf.hidden, states)):
        assert (layer.n_visible, layer.n_hidden) == (SIZES[k], SIZES[k + 1])
        assert torch.equal(layer.W, state["linear.weight"])
        assert torch.equal(layer.linear.bias, state["linear.bias"])
        assert layer.W.data_ptr() != state["linear.weight"].data_ptr()  # a copy
    kept = clf.hidden[0].W.detach().clone()
    states[0]["linear.weight"].add_(1.0)  # changing the source leaves the classifier alone
    assert torch.equal(clf.hidden[0].W, kept)
    assert torch.all(clf.output.weight == 0) and torch.all(clf.output.bias == 0)
    assert clf.output.weight.shape == (N_CLASSES, SIZES[-1])


def test_from_encoder_states_uses_the_given_activation():
    states = encoder_states()
    x = torch.rand(4, SIZES[0], generator=gen(1))
    clf = DeepClassifier.from_encoder_states(states, N_CLASSES, activation="tanh")
    h = x
    for s in states:
        h = torch.tanh(h @ s["linear.weight"].t() + s["linear.bias"])
    assert torch.allclose(clf.features(x), h, atol=1e-6)


def test_from_encoder_states_rejects_mismatched_shapes():
    states = encoder_states()
    bad_chain = [states[0], {"linear.weight": torch.zeros(5, 9), "linear.bias": torch.zeros(5)}]
    with pytest.raises(ValueError, match="expects 9 inputs but layer 1 has 8 units"):
        DeepClassifier.from_encoder_states(bad_chain, N_CLASSES)
    bad_bias = [{"linear.weight": torch.zeros(8, 12), "linear.bias": torch.zeros(7)}]
    with pytest.raises((ValueError, RuntimeError), match="bias"):
        DeepClassifier.from_encoder_states(bad_bias, N_CLASSES)


def test_random_init_architecture_and_zero_output():
    clf = DeepClassifier.random_init(SIZES[0], SIZES[1:], N_CLASSES, generator=gen(0))
    widths = [clf.hidden[0].n_visible] + [layer.n_hidden for layer in clf.hidden]
    assert widths + [clf.output.out_features] == [*SIZES, N_CLASSES]
    assert [tuple(layer.W.shape) for layer in clf.hidden] == [(8, 12), (5, 8)]
    assert torch.all(clf.output.weight == 0) and torch.all(clf.output.bias == 0)
    for layer in clf.hidden:
        assert torch.all(layer.linear.bias == 0)
        bound = 4 * math.sqrt(6 / (layer.n_visible + layer.n_hidden))
        assert 0 < layer.W.abs().max() <= bound
    assert torch.equal(clf(torch.rand(3, SIZES[0])), torch.zeros(3, N_CLASSES))


def test_random_init_is_determined_by_the_generator_seed():
    a = DeepClassifier.random_init(SIZES[0], SIZES[1:], N_CLASSES, generator=gen(7))
    b = DeepClassifier.random_init(SIZES[0], SIZES[1:], N_CLASSES, generator=gen(7))
    c = DeepClassifier.random_init(SIZES[0], SIZES[1:], N_CLASSES, generator=gen(8))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["hidden.0.linear.weight"], sc["hidden.0.linear.weight"])
    # the two layers are two different draws, not one draw repeated
    assert not torch.equal(sa["hidden.0.linear.weight"][:5, :8], sa["hidden.1.linear.weight"])


def test_forward_is_the_output_layer_on_the_features_and_features_skip_dropout():
    clf = DeepClassifier.random_init(SIZES[0], SIZES[1:], N_CLASSES, dropout=0.5,
                                     generator=gen(0)).double()
    with torch.no_grad():
        clf.output.weight.copy_(torch.randn(N_CLASSES, SIZES[-1], generator=gen(1),
                                            dtype=torch.float64))
    x, _ = data()
    clf.eval()
    assert torch.allclose(clf(x), clf.output(clf.features(x)), rtol=0, atol=1e-14)
    first = torch.sigmoid(x @ clf.hidden[0].W.t() + clf.hidden[0].linear.bias)
    assert torch.allclose(clf.features(x, depth=1), first, rtol=0, atol=1e-14)
    clf.train()  # dropout active in forward, never in features
    assert torch.equal(clf.features(x), clf.eval().features(x))
    clf.train()
    torch.manual_seed(0)
    assert not torch.allclose(clf(x), clf.eval()(x))


def test_a_classifier_needs_a_hidden_layer():
    with pytest.raises(ValueError, match="at least one hidden layer"):
        DeepClassifier(hidden=[], n_classes=N_CLASSES)
    # a single encoder is enough
    assert len(DeepClassifier([EncoderLayer(4, 3)], N_CLASSES).hidden) == 1
