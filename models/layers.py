"""The encoder layer shared by a denoising autoencoder and the deep classifier, its
initialisation schemes, and the linear map of P members whose parameters are stacked.

One ``EncoderLayer`` object lives in both places (docs/design.md §2: in the tutorial's ``SdA`` the
dA layers and the MLP's sigmoid layers share the same ``W`` and ``b``).

Stacked members (``stack_members``, ``stacked_linear``) are P networks that differ only in
their seeds, one parameter of shape (P, …) per layer: the deep autoencoder
(``models.autoencoder``) and the training populations (``training.population``) compute
with them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

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


def stack_members(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    """One parameter holding P members' tensors along a new leading axis (copies)."""
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y_p = x_p W_pᵀ + b_p for every member: (P, B, n_in) -> (P, B, n_out).

    Under autograd it is computed as yᵀ = W xᵀ + b, so that the weight's gradient, dyᵀ x,
    comes out in W's own (P, n_out, n_in) layout: with y = x Wᵀ it comes out transposed,
    and autograd then copies it into W's layout, a strided copy that cost more than the
    matmuls (measured on a CPU: 25 ms against 15 ms for forward and backward at 784→256,
    B = 20, P = 32). Without autograd (validation, the fused SGD steps) y = x Wᵀ is the
    faster one (5.8 ms against 7.7 ms there): ``bmm`` writing a transposed output is slow.
    A shared input (B, n_in) is one (B, n_in) @ (n_in, P·n_out) GEMM instead of P.
    """
    if x.dim() == 2:
        P, n_out, n_in = weight.shape
        y = torch.addmm(bias.reshape(1, -1), x, weight.reshape(P * n_out, n_in).t())
        return y.view(len(x), P, n_out).transpose(0, 1)
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
        return torch.baddbmm(bias.unsqueeze(2), weight, x.transpose(1, 2)).transpose(1, 2)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))
