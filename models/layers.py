"""The encoder layer shared by a denoising autoencoder and the deep classifier, and its
initialisation schemes.

One ``EncoderLayer`` object lives in both places (docs/design.md §2: in the tutorial's ``SdA`` the
dA layers and the MLP's sigmoid layers share the same ``W`` and ``b``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu")
INIT_SCHEMES = ("tutorial", "xavier", "he")
LEAKY_SLOPE = 0.01


def activate(a: torch.Tensor, activation: str) -> torch.Tensor:
    """s(a) for the named hidden-unit non-linearity; ``linear`` (s(a) = a) is the code
    layer of a deep autoencoder (Hinton & Salakhutdinov 2006)."""
    if activation == "linear":
        return a
    if activation == "sigmoid":
        return torch.sigmoid(a)
    if activation == "tanh":
        return torch.tanh(a)
    if activation == "relu":
        return F.relu(a)
    if activation == "leaky_relu":
        return F.leaky_relu(a, LEAKY_SLOPE)
    raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")


def init_bound(scheme: str, activation: str, fan_in: int, fan_out: int) -> tuple[str, float]:
    """The distribution of initial weights as ``("uniform", bound)`` or ``("normal", std)``.

    - ``tutorial``: U(±4·√(6/(fan_in+fan_out))) for sigmoid, U(±√(6/(fan_in+fan_out)))
      otherwise (Glorot & Bengio 2010; the factor 4 is the tutorial's sigmoid correction).
    - ``xavier``: U(±√(6/(fan_in+fan_out))) for every activation (Glorot's formula, gain 1).
    - ``he``: N(0, 2/((1+a²)·fan_in)), a the leaky slope (He et al. 2015, fan-in mode).
    """
    glorot = math.sqrt(6.0 / (fan_in + fan_out))
    if scheme == "tutorial":
        return "uniform", 4 * glorot if activation == "sigmoid" else glorot
    if scheme == "xavier":
        return "uniform", glorot
    if scheme == "he":
        slope = LEAKY_SLOPE if activation == "leaky_relu" else 0.0
        return "normal", math.sqrt(2.0 / ((1 + slope**2) * fan_in))
    raise ValueError(f"unknown init scheme {scheme!r}; choose one of {INIT_SCHEMES}")


@torch.no_grad()
def init_weight_(
    weight: torch.Tensor, scheme: str, activation: str, generator: Optional[torch.Generator]
) -> None:
    """Initialise a (fan_out, fan_in) weight in place by ``scheme``."""
    fan_out, fan_in = weight.shape
    kind, scale = init_bound(scheme, activation, fan_in, fan_out)
    if kind == "uniform":
        weight.uniform_(-scale, scale, generator=generator)
    else:
        weight.normal_(0.0, scale, generator=generator)


class EncoderLayer(nn.Module):
    """h = s(W x + b): one hidden layer, shape (B, n_visible) -> (B, n_hidden).

    Args:
        n_visible: Input units.
        n_hidden: Hidden units.
        activation: One of ``ACTIVATIONS``.
        init: One of ``INIT_SCHEMES``; biases start at 0.
        generator: Source of the initial weights.
    """

    def __init__(
        self,
        n_visible: int,
        n_hidden: int,
        activation: str = "sigmoid",
        init: str = "tutorial",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        activate(torch.zeros(1), activation)  # validate the name early
        self.n_visible, self.n_hidden, self.activation = n_visible, n_hidden, activation
        self.linear = nn.Linear(n_visible, n_hidden)
        init_weight_(self.linear.weight, init, activation, generator)
        nn.init.zeros_(self.linear.bias)

    @property
    def W(self) -> nn.Parameter:
        """The weight matrix, shape (n_hidden, n_visible)."""
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activate(self.linear(x), self.activation)  # (B, n_visible) -> (B, n_hidden)
