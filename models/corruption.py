"""Corruption processes q(x̃ | x) for denoising autoencoders (Vincent et al. 2010, §4.1).

Each function corrupts a *copy* of its input and draws its noise from an explicit
``torch.Generator`` (or the seeded global RNG when ``generator`` is None), so that runs are
reproducible. A level of 0 returns the input unchanged: a plain autoencoder.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Generator = Optional[torch.Generator]


def masking_noise(x: torch.Tensor, level: float, generator: Generator = None) -> torch.Tensor:
    """Masking noise: x̃_i = 0 with probability ν, else x_i.

    Args:
        x: Clean input, shape (B, D).
        level: ν, the probability of zeroing each component.
        generator: Source of randomness.
    """
    if level == 0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= level
    return x * keep


def gaussian_noise(x: torch.Tensor, level: float, generator: Generator = None) -> torch.Tensor:
    """Additive isotropic Gaussian noise: x̃ = x + ε, ε ~ N(0, σ² I).

    Args:
        x: Clean input, shape (B, D).
        level: σ, the standard deviation of the noise.
        generator: Source of randomness.
    """
    if level == 0:
        return x
    return x + level * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def salt_and_pepper_noise(
    x: torch.Tensor,
    level: float,
    generator: Generator = None,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """Salt-and-pepper noise: a fraction ν of components set to ``low`` or ``high``, 50/50.

    Args:
        x: Clean input, shape (B, D).
        level: ν, the probability that a component is overwritten.
        generator: Source of randomness.
        low: The minimum possible value ("pepper"), 0 for inputs in [0,1].
        high: The maximum possible value ("salt"), 1 for inputs in [0,1].
    """
    if level == 0:
        return x
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    # One uniform draw decides both events: u < ν/2 -> low, ν/2 <= u < ν -> high.
    out = torch.where(u < level / 2, torch.full_like(x, low), x)
    return torch.where((u >= level / 2) & (u < level), torch.full_like(x, high), out)


def multiplicative_gaussian_noise(
    x: torch.Tensor, level: float, generator: Generator = None
) -> torch.Tensor:
    """Multiplicative Gaussian noise: x̃ = x + ε·x, ε ~ N(0, σ²), drawn per component.

    Args:
        x: Clean input, shape (B, D).
        level: σ, the standard deviation of ε.
        generator: Source of randomness.
    """
    if level == 0:
        return x
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + level * eps * x


NOISES: dict[str, Callable[..., torch.Tensor]] = {
    "masking": masking_noise,
    "gaussian": gaussian_noise,
    "salt_and_pepper": salt_and_pepper_noise,
    "multiplicative_gaussian": multiplicative_gaussian_noise,
}


def corrupt(
    x: torch.Tensor,
    noise: str,
    level: float,
    generator: Generator = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Apply the named corruption process. ``value_range`` is used by salt-and-pepper only."""
    try:
        fn = NOISES[noise]
    except KeyError:
        raise ValueError(f"unknown noise {noise!r}; choose one of {sorted(NOISES)}") from None
    if noise == "salt_and_pepper":
        return fn(x, level, generator, low=value_range[0], high=value_range[1])
    return fn(x, level, generator)
