"""The denoising autoencoder layer and the initialisation of its weights.

Losses against numbers worked out by hand, tied/untied decoders as explicit matrix products,
float64 gradient checks, the clean-target rule of the denoising criterion, and the
distribution of initial weights of every scheme on a 784×1000 layer.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from models.dae import DenoisingAutoencoder
from models.layers import EncoderLayer, init_bound


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# x in [0,1] and chosen decoder logits a, both (2, 3).
X = [[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]]
A = [[0.0, 1.0, -2.0], [2.0, -1.0, 0.0]]


def log1pexp(t: float) -> float:
    return math.log(1 + math.exp(t))


def test_cross_entropy_loss_matches_hand_computation():
    # -log σ(a) = log(1+e^{-a}),  -log(1-σ(a)) = log(1+e^{a}).
    row1 = (
        math.log(2)  # x=1, a=0: -log σ(0)
        + log1pexp(1.0)  # x=0, a=1: -log(1-σ(1))
        + 0.5 * log1pexp(2.0) + 0.5 * log1pexp(-2.0)  # x=0.5, a=-2: both terms, halved
    )
    row2 = (
        log1pexp(2.0)  # x=0, a=2: -log(1-σ(2))
        + log1pexp(1.0)  # x=1, a=-1: -log σ(-1)
        + math.log(2)  # x=1, a=0: -log σ(0)
    )
    expected = (row1 + row2) / 2  # summed over features, averaged over the 2 rows
    dae = DenoisingAutoencoder(3, 2, loss="cross_entropy").double()
    x, a = torch.tensor(X, dtype=torch.float64), torch.tensor(A, dtype=torch.float64)
    got = dae.reconstruction_loss(x, a).item()
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    # 0.693147 + 1.313262 + 1.126928 = 3.133337;  2.126928 + 1.313262 + 0.693147 = 4.133337
    assert expected == pytest.approx(3.633337, abs=1e-6)


def test_squared_error_loss_matches_hand_computation():
    # row 1: (1-0)² + (0-1)² + (0.5+2)² = 1 + 1 + 6.25 = 8.25
    # row 2: (0-2)² + (1+1)² + (1-0)²   = 4 + 4 + 1    = 9
    expected = (8.25 + 9.0) / 2
    dae = DenoisingAutoencoder(3, 2, loss="squared_error").double()
    x, a = torch.tensor(X, dtype=torch.float64), torch.tensor(A, dtype=torch.float64)
    assert dae.reconstruction_loss(x, a).item() == pytest.approx(8.625, rel=1e-15)
    assert expected == 8.625


def test_decoder_output_follows_the_loss():
    y = torch.rand(4, 2, generator=gen(0), dtype=torch.float64)
    ce = DenoisingAutoencoder(3, 2, loss="cross_entropy", generator=gen(1)).double()
    se = DenoisingAutoencoder(3, 2, loss="squared_error", generator=gen(1)).double()
    assert torch.allclose(ce.decode(y), torch.sigmoid(ce.decoder_logits(y)), rtol=0, atol=1e-15)
    assert torch.equal(se.decode(y), se.decoder_logits(y))


def test_tied_decoder_is_y_times_W_plus_b_prime_and_has_no_W_prime():
    dae = DenoisingAutoencoder(5, 3, tied=True, generator=gen(0)).double()
    with torch.no_grad():
        dae.b_prime.copy_(torch.arange(5, dtype=torch.float64) / 10)  # non-zero b'
    y = torch.rand(4, 3, generator=gen(1), dtype=torch.float64)
    W = dae.encoder.W  # (n_hidden, n_visible) = (3, 5)
    assert W.shape == (3, 5)
    expected = y @ W + dae.b_prime  # W' = Wᵀ: (4, 3) @ (3, 5) -> (4, 5)
    assert torch.allclose(dae.decoder_logits(y), expected, rtol=0, atol=1e-14)
    assert dae.tied and dae.W_prime is None
    names = {name for name, _ in dae.named_parameters()}
    assert names == {"encoder.linear.weight", "encoder.linear.bias", "b_prime"}


def test_untied_decoder_has_its_own_W_prime():
    tied = DenoisingAutoencoder(5, 3, tied=True, generator=gen(0)).double()
    untied = DenoisingAutoencoder(5, 3, tied=False, generator=gen(0)).double()
    assert not untied.tied
    names = {name for name, _ in untied.named_parameters()}
    assert names == {"encoder.linear.weight", "encoder.linear.bias", "b_prime", "W_prime"}
    assert untied.W_prime.shape == (5, 3)  # (n_visible, n_hidden)
    # same generator seed: the encoders are equal, so only the decoder differs
    assert torch.equal(untied.encoder.W, tied.encoder.W)
    assert not torch.allclose(untied.W_prime, tied.encoder.W.t())
    y = torch.rand(4, 3, generator=gen(1), dtype=torch.float64)
    expected = y @ untied.W_prime.t() + untied.b_prime  # (4, 3) @ (3, 5)
    assert torch.allclose(untied.decoder_logits(y), expected, rtol=0, atol=1e-14)
    assert not torch.allclose(untied.decoder_logits(y), tied.decoder_logits(y))
    # W' starts in the same scheme as W: U(±4·sqrt(6/(3+5)))
    assert untied.W_prime.abs().max() <= 4 * math.sqrt(6 / 8)


def test_encode_is_sigmoid_of_W_x_plus_b():
    dae = DenoisingAutoencoder(5, 3, generator=gen(0)).double()
    with torch.no_grad():
        dae.encoder.linear.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    x = torch.rand(4, 5, generator=gen(1), dtype=torch.float64)
    expected = torch.sigmoid(x @ dae.encoder.W.t() + dae.encoder.linear.bias)
    assert torch.allclose(dae.encode(x), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("loss", ["cross_entropy", "squared_error"])
@pytest.mark.parametrize("tied", [True, False])
def test_gradcheck_of_the_full_loss(loss, tied):
    dae = DenoisingAutoencoder(4, 3, tied=tied, loss=loss, corruption_level=0.3,
                               generator=gen(0)).double().eval()  # eval: no corruption
    with torch.no_grad():
        dae.b_prime.copy_(torch.tensor([0.1, -0.3, 0.2, 0.05], dtype=torch.float64))
        dae.encoder.linear.bias.copy_(torch.tensor([0.2, -0.1, 0.3], dtype=torch.float64))
    x = torch.rand(5, 4, generator=gen(1), dtype=torch.float64).clamp(0.05, 0.95)

    # w.r.t. the input: x is both the encoder's input and the reconstruction target
    assert torch.autograd.gradcheck(lambda inp: dae(inp), (x.clone().requires_grad_(),))

    # w.r.t. every parameter
    names = [name for name, _ in dae.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in dae.named_parameters())

    def loss_of_params(*values):
        return functional_call(dae, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(loss_of_params, params)


def test_gradient_of_W_in_a_tied_dae_collects_both_paths():
    """Tied: dL/dW is the sum of the encoder's and the decoder's contributions."""
    dae = DenoisingAutoencoder(4, 3, generator=gen(0)).double().eval()
    x = torch.rand(5, 4, generator=gen(1), dtype=torch.float64)
    dae(x).backward()
    g_tied = dae.encoder.W.grad.clone()

    # The same computation with W' a separate leaf holding Wᵀ's values.
    W = dae.encoder.W.detach().clone().requires_grad_()
    W_dec = dae.encoder.W.detach().t().clone().requires_grad_()
    y = torch.sigmoid(x @ W.t() + dae.encoder.linear.bias.detach())
    a = y @ W_dec.t() + dae.b_prime.detach()
    dae.reconstruction_loss(x, a).backward()
    assert torch.allclose(g_tied, W.grad + W_dec.grad.t(), rtol=0, atol=1e-14)


def test_train_mode_loss_is_measured_against_the_clean_input():
    dae = DenoisingAutoencoder(6, 4, noise="masking", corruption_level=0.5,
                               generator=gen(0)).double().train()
    x = 0.1 + 0.8 * torch.rand(8, 6, generator=gen(1), dtype=torch.float64)
    loss = dae(x, generator=gen(42))

    x_tilde = dae.corrupt(x, gen(42))  # the same mask
    assert (x_tilde == 0).any()  # the mask did hit something
    logits = dae.decoder_logits(dae.encode(x_tilde))
    clean_target = dae.reconstruction_loss(x, logits)
    corrupted_target = dae.reconstruction_loss(x_tilde, logits)
    uncorrupted_input = dae.reconstruction_loss(x, dae.decoder_logits(dae.encode(x)))

    assert torch.equal(loss, clean_target)
    assert abs(loss.item() - corrupted_target.item()) > 1e-3
    assert abs(loss.item() - uncorrupted_input.item()) > 1e-3


def test_eval_mode_does_not_corrupt_and_draws_no_noise():
    dae = DenoisingAutoencoder(6, 4, corruption_level=0.5, generator=gen(0)).double().eval()
    x = 0.1 + 0.8 * torch.rand(8, 6, generator=gen(1), dtype=torch.float64)
    g = gen(42)
    state = g.get_state()
    loss = dae(x, generator=g)
    assert torch.equal(g.get_state(), state)
    assert torch.equal(loss, dae.reconstruction_loss(x, dae.decoder_logits(dae.encode(x))))


def test_invalid_loss_and_corruption_level_are_rejected():
    with pytest.raises(ValueError, match="mse"):
        DenoisingAutoencoder(4, 3, loss="mse")
    for level in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="corruption_level"):
            DenoisingAutoencoder(4, 3, corruption_level=level)
    for level in (0.0, 0.999):  # the closed/open ends of [0, 1)
        assert DenoisingAutoencoder(4, 3, corruption_level=level).corruption_level == level


def test_a_given_encoder_is_shared_not_copied():
    enc = EncoderLayer(5, 3, generator=gen(0))
    dae = DenoisingAutoencoder(5, 3, encoder=enc)
    assert dae.encoder is enc
    assert dae.encoder.W.data_ptr() == enc.W.data_ptr()


# --- initialisation schemes (models/layers.py) --------------------------------------------------

FAN_IN, FAN_OUT = 784, 1000
GLOROT = math.sqrt(6 / (FAN_IN + FAN_OUT))
N_WEIGHTS = FAN_IN * FAN_OUT


def big_layer(activation: str, init: str, seed: int = 0) -> EncoderLayer:
    return EncoderLayer(FAN_IN, FAN_OUT, activation, init, gen(seed))


def test_init_bound_values_by_hand():
    assert init_bound("tutorial", "sigmoid", 784, 1000) == ("uniform", 4 * math.sqrt(6 / 1784))
    assert init_bound("tutorial", "tanh", 784, 1000) == ("uniform", math.sqrt(6 / 1784))
    assert init_bound("xavier", "sigmoid", 784, 1000) == ("uniform", math.sqrt(6 / 1784))
    assert init_bound("he", "relu", 784, 1000) == ("normal", math.sqrt(2 / 784))
    kind, std = init_bound("he", "leaky_relu", 784, 1000)
    assert kind == "normal" and std == pytest.approx(math.sqrt(2 / (1.0001 * 784)), rel=1e-12)
    with pytest.raises(ValueError, match="orthogonal"):
        init_bound("orthogonal", "sigmoid", 784, 1000)


@pytest.mark.parametrize(
    "activation, init, bound",
    [("sigmoid", "tutorial", 4 * GLOROT), ("tanh", "tutorial", GLOROT),
     ("sigmoid", "xavier", GLOROT), ("relu", "xavier", GLOROT)],
)
def test_uniform_schemes_fill_their_interval(activation, init, bound):
    layer = big_layer(activation, init)
    w = layer.W.detach().double()
    assert w.shape == (FAN_OUT, FAN_IN)
    assert w.abs().max().item() <= bound * (1 + 1e-6)  # float32 rounding of the bound
    # 784k draws: the largest |w| lies within 1% of the bound with probability ~1 - 0.99^784000
    assert w.abs().max().item() > 0.99 * bound
    # U(-c, c) has std c/sqrt(3); the sample std over 784k draws is good to ~0.1%
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert abs(w.mean().item()) < 4 * (bound / math.sqrt(3)) / math.sqrt(N_WEIGHTS)
    assert torch.all(layer.linear.bias == 0)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
def test_he_scheme_is_normal_with_std_sqrt_2_over_fan_in(activation):
    layer = big_layer(activation, "he")
    w = layer.W.detach().double()
    std = math.sqrt(2 / FAN_IN)
    assert w.std().item() == pytest.approx(std, rel=0.02)
    assert abs(w.mean().item()) < 4 * std / math.sqrt(N_WEIGHTS)
    # a normal, not a uniform: over 784k draws the largest |w| is near 4.9σ (a uniform of
    # this std would stop at sqrt(3)σ ≈ 1.73σ)
    assert w.abs().max().item() > 4 * std
    assert torch.all(layer.linear.bias == 0)


@pytest.mark.parametrize("init", ["tutorial", "xavier", "he"])
def test_same_generator_seed_gives_the_same_weights(init):
    a = EncoderLayer(30, 20, "sigmoid", init, gen(5))
    b = EncoderLayer(30, 20, "sigmoid", init, gen(5))
    c = EncoderLayer(30, 20, "sigmoid", init, gen(6))
    assert torch.equal(a.W, b.W)
    assert not torch.equal(a.W, c.W)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="softplus"):
        EncoderLayer(3, 2, activation="softplus")
