"""Corruption processes q(x̃ | x) for denoising autoencoders (Vincent et al. 2010, §4.1).

Each function corrupts a *copy* of its input and draws its noise from an explicit
``torch.Generator`` (or the seeded global RNG when ``generator`` is None), so that runs are
reproducible. A level of 0 returns the input unchanged: a plain autoencoder.

Every process is one standard draw of x's shape (uniform U[0, 1) or normal N(0, 1))
followed by element-wise arithmetic, both named in one table, ``PROCESSES``. ``corrupt_members`` uses
that split for populations: P draws, one from each member's generator (the numbers each
member's single run draws), then one element-wise pass over all P members.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple, Optional, Sequence, Union

if TYPE_CHECKING:  # torch is imported where it is used: the config reads this table, and
    import torch  # the CLI's --help must not pay for importing torch.

Generator = Optional["torch.Generator"]
Bound = Union[float, "torch.Tensor"]  # a number, or per-member values broadcast over x


def check_level(level: float, name: str = "corruption_level") -> float:
    """The one range check of a corruption level ν or σ: [0, 1); 0 is a plain autoencoder.

    Args:
        level: The level to check.
        name: How the error names the field, e.g. ``corruption_levels[1]``.
    Raises:
        ValueError: naming the field and the allowed range.
    """
    if not 0 <= level < 1:
        raise ValueError(f"{name} = {level} is outside [0, 1)")
    return level


def _masking(x: torch.Tensor, u: torch.Tensor, level: float, low: Bound, high: Bound):
    return x * (u >= level)  # x ⊙ [u ≥ ν]


def _gaussian(x: torch.Tensor, u: torch.Tensor, level: float, low: Bound, high: Bound):
    return x + level * u  # x + σ u


def _multiplicative_gaussian(x: torch.Tensor, u: torch.Tensor, level: float, low: Bound,
                             high: Bound):
    return x + level * u * x  # x + σ u ⊙ x


def _salt_and_pepper(x: torch.Tensor, u: torch.Tensor, level: float, low: Bound, high: Bound):
    import torch

    # One uniform draw decides both events: u < ν/2 -> low, ν/2 <= u < ν -> high.
    low = torch.as_tensor(low, dtype=x.dtype, device=x.device)
    high = torch.as_tensor(high, dtype=x.dtype, device=x.device)
    out = torch.where(u < level / 2, low, x)
    return torch.where((u >= level / 2) & (u < level), high, out)


class NoiseProcess(NamedTuple):
    """One corruption process: its standard draw (``uniform`` U[0, 1) or ``normal`` N(0, 1),
    of x's shape) and the element-wise arithmetic ``apply(x, u, level, low, high)``."""

    draw: str
    apply: Callable[..., "torch.Tensor"]


#: The one table of corruption processes: ``config.stages.NoiseType`` is derived from its keys,
#: and every function below dispatches through it.
PROCESSES: dict[str, NoiseProcess] = {
    "masking": NoiseProcess("uniform", _masking),
    "gaussian": NoiseProcess("normal", _gaussian),
    "salt_and_pepper": NoiseProcess("uniform", _salt_and_pepper),
    "multiplicative_gaussian": NoiseProcess("normal", _multiplicative_gaussian),
}
#: The names of the processes, in table order.
NOISE_NAMES = tuple(PROCESSES)


def draw_noise(noise: str, x: torch.Tensor, generator: Generator = None,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The standard draw of process ``noise`` with x's shape, dtype and device (into ``out``
    when given: the same numbers, written in place)."""
    import torch

    sample = torch.rand if _process(noise).draw == "uniform" else torch.randn
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
    return _process(noise).apply(x, u, level, low, high)


def _process(noise: str) -> NoiseProcess:
    if noise not in PROCESSES:
        raise ValueError(f"unknown noise {noise!r}; choose one of {sorted(PROCESSES)}")
    return PROCESSES[noise]


def corrupt(
    x: torch.Tensor,
    noise: str,
    level: float,
    generator: Generator = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Apply the named corruption process. ``value_range`` is used by salt-and-pepper only."""
    _process(noise)
    if level == 0:
        return x
    u = draw_noise(noise, x, generator)
    return apply_noise(x, u, noise, level, value_range[0], value_range[1])


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
    import torch

    _process(noise)
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
