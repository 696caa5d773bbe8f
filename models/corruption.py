"""Corruption processes q(x̃ | x) for denoising autoencoders (Vincent et al. 2010, §4.1).

Each function corrupts a *copy* of its input and draws its noise from an explicit
``torch.Generator`` (or the seeded global RNG when ``generator`` is None), so that runs are
reproducible. A level of 0 returns the input unchanged: a plain autoencoder.

Every process is one standard draw of x's shape (``DRAWS``: uniform U[0, 1) or normal
N(0, 1)) followed by element-wise arithmetic (``apply_noise``). ``corrupt_members`` uses
that split for populations: P draws, one from each member's generator (the numbers each
member's single run draws), then one element-wise pass over all P members.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

Generator = Optional[torch.Generator]
Bound = Union[float, torch.Tensor]  # a number, or per-member values broadcast over x

#: The standard draw, of x's shape, each process starts from.
DRAWS = {"masking": "uniform", "gaussian": "normal", "salt_and_pepper": "uniform",
         "multiplicative_gaussian": "normal"}


def draw_noise(noise: str, x: torch.Tensor, generator: Generator = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The standard draw of process ``noise`` with x's shape, dtype and device (into ``out``
    when given: the same numbers, written in place)."""
    _check(noise)
    sample = torch.rand if DRAWS[noise] == "uniform" else torch.randn
    if out is not None:
        return sample(x.shape, generator=generator, out=out)
    return sample(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def apply_noise(x: torch.Tensor, u: torch.Tensor, noise: str, level: float,
                low: Bound = 0.0, high: Bound = 1.0) -> torch.Tensor:
    """x̃ from x and the standard draw u of process ``noise``, element-wise.

    masking: x ⊙ [u ≥ ν]; gaussian: x + σ u; salt-and-pepper: ``low`` where u < ν/2,
    ``high`` where ν/2 ≤ u < ν, else x; multiplicative gaussian: x + σ u ⊙ x.
    ``low``/``high`` may be tensors that broadcast over x, e.g. (P, 1, 1) per member.
    """
    _check(noise)
    if noise == "masking":
        return x * (u >= level)
    if noise == "gaussian":
        return x + level * u
    if noise == "multiplicative_gaussian":
        return x + level * u * x
    # One uniform draw decides both events: u < ν/2 -> low, ν/2 <= u < ν -> high.
    low = torch.as_tensor(low, dtype=x.dtype, device=x.device)
    high = torch.as_tensor(high, dtype=x.dtype, device=x.device)
    out = torch.where(u < level / 2, low, x)
    return torch.where((u >= level / 2) & (u < level), high, out)


def _check(noise: str) -> None:
    if noise not in DRAWS:
        raise ValueError(f"unknown noise {noise!r}; choose one of {sorted(DRAWS)}")




def masking_noise(x: torch.Tensor, level: float, generator: Generator = None) -> torch.Tensor:
    """Masking noise: x̃_i = 0 with probability ν, else x_i.

    Args:
        x: Clean input, shape (B, D).
        level: ν, the probability of zeroing each component.
        generator: Source of randomness.
    """
    if level == 0:
        return x
    return apply_noise(x, draw_noise("masking", x, generator), "masking", level)


def gaussian_noise(x: torch.Tensor, level: float, generator: Generator = None) -> torch.Tensor:
    """Additive isotropic Gaussian noise: x̃ = x + ε, ε ~ N(0, σ² I).

    Args:
        x: Clean input, shape (B, D).
        level: σ, the standard deviation of the noise.
        generator: Source of randomness.
    """
    if level == 0:
        return x
    return apply_noise(x, draw_noise("gaussian", x, generator), "gaussian", level)


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
    u = draw_noise("salt_and_pepper", x, generator)
    return apply_noise(x, u, "salt_and_pepper", level, low, high)


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
    u = draw_noise("multiplicative_gaussian", x, generator)
    return apply_noise(x, u, "multiplicative_gaussian", level)


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
    _check(noise)
    if noise == "salt_and_pepper":
        return NOISES[noise](x, level, generator, low=value_range[0], high=value_range[1])
    return NOISES[noise](x, level, generator)


def corrupt_members(
    x: torch.Tensor,
    noise: str,
    level: float,
    generators: Sequence[torch.Generator],
    value_ranges: Sequence[tuple[float, float]],
) -> torch.Tensor:
    """x̃_p = ``corrupt(x[p], noise, level, generators[p], value_ranges[p])`` for every member
    p, (P, B, D) -> (P, B, D): member p's draw is the one its single run makes, and the
    arithmetic is one element-wise pass over all members instead of P."""
    _check(noise)
    if len(generators) != len(x) or len(value_ranges) != len(x):
        raise ValueError(f"{len(x)} members need as many generators and value ranges; got "
                         f"{len(generators)} and {len(value_ranges)}")
    if level == 0:
        return x
    u = torch.empty_like(x)
    for p, g in enumerate(generators):
        draw_noise(noise, x[p], g, out=u[p])
    low, high = (torch.tensor([r[i] for r in value_ranges], dtype=x.dtype,
                              device=x.device).view(-1, *[1] * (x.dim() - 1)) for i in (0, 1))
    return apply_noise(x, u, noise, level, low, high)
