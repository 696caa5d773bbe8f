"""Corruption processes q(x̃ | x): rates and moments against their expected values.

Every statistical check uses n = 10^5 components and a 4σ band, so a correct implementation
fails with probability about 6e-5 per check (and, with fixed seeds, never).
"""

from __future__ import annotations

import math

import pytest
import torch

from models.corruption import PROCESSES, corrupt, corrupt_members

N_ROWS, N_COLS = 1000, 100  # 10^5 components
N = N_ROWS * N_COLS


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def positive_input(seed: int = 0) -> torch.Tensor:
    """(1000, 100) float64 values in [0.25, 0.75]: never 0, never 1, never a custom low/high."""
    return 0.25 + 0.5 * torch.rand(N_ROWS, N_COLS, generator=gen(seed), dtype=torch.float64)


def four_sigma(p: float, n: int) -> float:
    """4 standard deviations of a binomial proportion with success rate p over n draws."""
    return 4 * math.sqrt(p * (1 - p) / n)


# --- masking ----------------------------------------------------------------------------------


@pytest.mark.parametrize("nu", [0.1, 0.25, 0.5])
def test_masking_rate_within_4_sigma(nu):
    x = positive_input()
    x_tilde = corrupt(x, "masking", nu, gen(1))
    rate = (x_tilde == 0).double().mean().item()
    assert abs(rate - nu) < four_sigma(nu, N), (rate, nu)


def test_masking_zeroes_masked_and_keeps_the_rest_exactly():
    x = positive_input()
    x_tilde = corrupt(x, "masking", 0.3, gen(2))
    masked = x_tilde == 0
    assert masked.any() and (~masked).any()
    # every component is either exactly 0 or exactly the input, bit for bit
    assert torch.equal(x_tilde[~masked], x[~masked])
    assert torch.all(x_tilde[masked] == 0.0)
    assert x_tilde.dtype == torch.float64 and x_tilde.shape == x.shape


def test_the_same_generator_seed_draws_the_same_corruption():
    x = positive_input()
    assert torch.equal(corrupt(x, "masking", 0.2, gen(3)), corrupt(x, "masking", 0.2, gen(3)))
    assert not torch.equal(corrupt(x, "masking", 0.2, gen(3)), corrupt(x, "masking", 0.2, gen(4)))


# --- additive gaussian --------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.1, 0.5])
def test_gaussian_noise_has_the_requested_std_and_zero_mean(sigma):
    x = positive_input()
    eps = corrupt(x, "gaussian", sigma, gen(4)) - x
    # sample std of N(0, σ²) over 1e5 draws: relative error ~ 1/sqrt(2n) = 0.22%; allow 2%
    assert abs(eps.std().item() / sigma - 1) < 0.02
    # sample mean: standard error σ/sqrt(n)
    assert abs(eps.mean().item()) < 4 * sigma / math.sqrt(N)
    # the noise is independent of x: every component moved
    assert (eps != 0).all()


# --- salt and pepper ----------------------------------------------------------------------------


@pytest.mark.parametrize("nu", [0.1, 0.4])
def test_salt_and_pepper_rate_and_even_split(nu):
    x = positive_input()
    x_tilde = corrupt(x, "salt_and_pepper", nu, gen(5))  # low=0, high=1 by default
    low, high = x_tilde == 0.0, x_tilde == 1.0
    changed = x_tilde != x
    # overwritten components are exactly the low or high ones; the rest are the input
    assert torch.equal(changed, low | high)
    assert torch.equal(x_tilde[~changed], x[~changed])
    n_changed = int(changed.sum())
    rate = n_changed / N
    assert abs(rate - nu) < four_sigma(nu, N), (rate, nu)
    share_low = int(low.sum()) / n_changed
    assert abs(share_low - 0.5) < four_sigma(0.5, n_changed), share_low


def test_salt_and_pepper_respects_custom_low_and_high_through_corrupt():
    x = positive_input()
    nu = 0.3
    x_tilde = corrupt(x, "salt_and_pepper", nu, gen(6), value_range=(-1.0, 2.0))
    low, high = x_tilde == -1.0, x_tilde == 2.0
    assert low.any() and high.any()
    # no 0 and no 1 were written: the custom values replaced the [0,1] defaults
    assert not (x_tilde == 0.0).any() and not (x_tilde == 1.0).any()
    unchanged = ~(low | high)
    assert torch.equal(x_tilde[unchanged], x[unchanged])
    n_changed = int((low | high).sum())
    assert abs(n_changed / N - nu) < four_sigma(nu, N)
    assert abs(int(low.sum()) / n_changed - 0.5) < four_sigma(0.5, n_changed)


# --- multiplicative gaussian --------------------------------------------------------------------


def test_multiplicative_gaussian_relative_noise_has_std_sigma():
    x = positive_input()
    sigma = 0.2
    rel = (corrupt(x, "multiplicative_gaussian", sigma, gen(7)) - x) / x
    assert abs(rel.std().item() / sigma - 1) < 0.02
    assert abs(rel.mean().item()) < 4 * sigma / math.sqrt(N)
    # zero stays zero: the noise scales with the input
    zeros = torch.zeros(3, 4, dtype=torch.float64)
    assert torch.equal(corrupt(zeros, "multiplicative_gaussian", sigma, gen(7)), zeros)


# --- properties common to every process ---------------------------------------------------------


@pytest.mark.parametrize("noise", sorted(PROCESSES))
def test_level_zero_is_the_identity(noise):
    x = positive_input()
    assert torch.equal(corrupt(x, noise, 0.0, gen(8)), x)


@pytest.mark.parametrize("noise", sorted(PROCESSES))
def test_same_seed_same_corruption_different_seed_different(noise):
    x = positive_input()[:50]
    a = corrupt(x, noise, 0.3, gen(11))
    b = corrupt(x, noise, 0.3, gen(11))
    c = corrupt(x, noise, 0.3, gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


@pytest.mark.parametrize("noise", sorted(PROCESSES))
def test_global_rng_is_used_when_no_generator_is_given(noise):
    x = positive_input()[:50]
    torch.manual_seed(123)
    a = corrupt(x, noise, 0.3)
    torch.manual_seed(123)
    b = corrupt(x, noise, 0.3)
    assert torch.equal(a, b) and not torch.equal(a, x)


@pytest.mark.parametrize("noise", sorted(PROCESSES))
def test_corruption_does_not_modify_its_input(noise):
    x = positive_input()[:50]
    before = x.clone()
    out = corrupt(x, noise, 0.5, gen(13))
    assert torch.equal(x, before)
    assert out.data_ptr() != x.data_ptr()
    assert out.dtype == x.dtype and out.shape == x.shape


def test_unknown_noise_is_rejected_naming_the_choices():
    x = positive_input()[:2]
    with pytest.raises(ValueError) as info:
        corrupt(x, "dropout", 0.1, gen(0))
    message = str(info.value)
    assert "'dropout'" in message
    for name in ("masking", "gaussian", "salt_and_pepper", "multiplicative_gaussian"):
        assert name in message


@pytest.mark.parametrize("noise", sorted(PROCESSES))
def test_corrupting_members_together_is_each_member_corrupted_alone(noise):
    """A population's corruption: member p's slice is, bit for bit, what ``corrupt`` gives
    its single run from the same generator, with its own salt-and-pepper value range."""
    x = torch.stack([positive_input(s)[:40] for s in range(3)]) - 0.5  # (3, 40, 100)
    ranges = [(-0.5, 0.5), (-1.0, 2.0), (0.0, 0.25)]
    together = corrupt_members(x, noise, 0.3, [gen(20 + p) for p in range(3)], ranges)
    for p in range(3):
        alone = corrupt(x[p], noise, 0.3, gen(20 + p), ranges[p])
        assert torch.equal(together[p], alone)
    assert not torch.equal(together[0], x[0])
    if noise == "salt_and_pepper":  # the per-member extremes really are used
        assert (together[1] == 2.0).any() and not (together[0] == 2.0).any()
    with pytest.raises(ValueError, match="3 members need as many generators"):
        corrupt_members(x, noise, 0.3, [gen(0)], ranges)


def test_the_config_literal_is_the_process_table():
    """Adding a process to ``PROCESSES`` adds it to the config; nothing else lists them."""
    from typing import get_args

    from config.stages import NoiseType, PretrainConfig

    assert get_args(NoiseType) == tuple(PROCESSES)
    for name in PROCESSES:
        assert PretrainConfig(noise=name).noise == name
    with pytest.raises(ValueError, match="noise"):
        PretrainConfig(noise="dropout")


@pytest.mark.parametrize("noise", sorted(PROCESSES))
def test_every_process_has_its_own_arithmetic(noise):
    """No process falls through to another's: from the same x and draw u, each table entry's
    result is computed by hand here (x = 0.5, ν = σ = 0.5)."""
    x = torch.full((4,), 0.5, dtype=torch.float64)
    u = torch.tensor([0.1, 0.3, 0.6, -1.0], dtype=torch.float64)
    expected = {
        "masking": [0.0, 0.0, 0.5, 0.0],  # x where u >= 0.5
        "gaussian": [0.55, 0.65, 0.8, 0.0],  # x + 0.5 u
        "salt_and_pepper": [0.0, 1.0, 0.5, 0.0],  # low below 0.25, high in [0.25, 0.5)
        "multiplicative_gaussian": [0.525, 0.575, 0.65, 0.25],  # x + 0.5 u x
    }[noise]
    out = PROCESSES[noise].apply(x, u, 0.5, 0.0, 1.0)
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("level", [-0.1, 1.0, 1.5])
def test_one_range_check_serves_the_config_the_grid_and_the_layer(level):
    from config.grid_spec import Factors
    from models.dae import DenoisingAutoencoder
    from config.stages import PretrainConfig

    with pytest.raises(ValueError, match=r"corruption_levels\[0\] = .* is outside \[0, 1\)"):
        PretrainConfig(corruption_levels=[level])
    with pytest.raises(ValueError, match=r"corruption_level\[1\] = .* is outside \[0, 1\)"):
        Factors(corruption_level=[0.1, level])
    with pytest.raises(ValueError, match=r"corruption_level = .* is outside \[0, 1\)"):
        DenoisingAutoencoder(4, 2, corruption_level=level)


def test_the_grid_takes_its_init_schemes_from_the_config():
    from typing import get_args

    from config.grid_spec import RANDOM_SCHEMES, InitValue
    from models.layers import INIT_SCHEMES
    from config.stages import InitScheme

    assert RANDOM_SCHEMES == get_args(InitScheme) == INIT_SCHEMES
    assert get_args(InitValue) == ("pretrained", "random", *INIT_SCHEMES)
