"""The denoising autoencoder layer (Vincent et al. 2008, 2010; the tutorial's ``dA``).

One method per equation::

    x̃ = corrupt(x)                      x̃ ~ q(x̃ | x)
    y = encode(x̃)     = s(W x̃ + b)
    z = decode(y)     = s(W' y + b')     W' = Wᵀ when tied
    L = reconstruction_loss(x, z)        measured against the *clean* x
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from models.corruption import check_level, corrupt as corrupt_fn
from models.layers import EncoderLayer, init_weight_

LOSSES = ("cross_entropy", "squared_error")


def reconstruction_loss(x: torch.Tensor, a: torch.Tensor, loss: str) -> torch.Tensor:
    """L(x, z) summed over features (the last axis) and averaged over the batch (the one
    before): (B, V) -> (), or per member (P, B, V) -> (P,) with x shared (B, V) or (P, B, V).

    cross-entropy: L = −Σ_i [x_i log z_i + (1−x_i) log(1−z_i)], z = sigmoid(a), computed
    from the logits ``a`` for stability; x must lie in [0,1].
    squared error: L = Σ_i (x_i − z_i)², z = a.

    Args:
        x: The clean input.
        a: Decoder logits of the (corrupted) input's code.
        loss: ``cross_entropy`` or ``squared_error``.
    """
    x = x.expand(a.shape)
    if loss == "cross_entropy":
        per_pixel = F.binary_cross_entropy_with_logits(a, x, reduction="none")
    else:
        per_pixel = (x - a) ** 2
    return per_pixel.sum(dim=-1).mean(dim=-1)


class DenoisingAutoencoder(nn.Module):
    """One dA layer with tied (default) or untied decoder weights.

    The decoder's output non-linearity follows the loss: a sigmoid for cross-entropy (inputs
    in [0,1]), the identity for squared error (real-valued inputs), as in Vincent et al. 2010,
    §4.2.

    Args:
        n_visible: Input units (784 for MNIST, or the width of the layer below).
        n_hidden: Hidden units.
        activation: Hidden non-linearity.
        init: Initialisation scheme of W (and W' when untied).
        tied: Decoder uses W' = Wᵀ.
        noise: Corruption process name (see ``models.corruption``).
        corruption_level: ν or σ of the corruption; 0 gives a plain autoencoder.
        loss: ``cross_entropy`` or ``squared_error``.
        value_range: (min, max) of the input, for salt-and-pepper noise.
        generator: Source of the initial weights.
        encoder: An existing ``EncoderLayer`` to train (shared, not copied); built when None.
    """

    def __init__(
        self,
        n_visible: int,
        n_hidden: int,
        activation: str = "sigmoid",
        init: str = "tutorial",
        tied: bool = True,
        noise: str = "masking",
        corruption_level: float = 0.0,
        loss: str = "cross_entropy",
        value_range: tuple[float, float] = (0.0, 1.0),
        generator: Optional[torch.Generator] = None,
        encoder: Optional[EncoderLayer] = None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown reconstruction loss {loss!r}; choose one of {LOSSES}")
        check_level(corruption_level)
        self.n_visible, self.n_hidden = n_visible, n_hidden
        self.noise, self.corruption_level, self.loss = noise, corruption_level, loss
        self.value_range = value_range
        self.encoder = encoder or EncoderLayer(n_visible, n_hidden, activation, init, generator)
        self.b_prime = nn.Parameter(torch.zeros(n_visible))
        self.W_prime: Optional[nn.Parameter] = None
        if not tied:
            self.W_prime = nn.Parameter(torch.empty(n_visible, n_hidden))
            init_weight_(self.W_prime, init, activation, generator)

    @property
    def tied(self) -> bool:
        return self.W_prime is None

    def corrupt(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x̃ ~ q(x̃ | x). Only the autoencoder's input is corrupted, only in training."""
        return corrupt_fn(x, self.noise, self.corruption_level, generator, self.value_range)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """y = s(W x + b), (B, n_visible) -> (B, n_hidden)."""
        return self.encoder(x)

    def decoder_logits(self, y: torch.Tensor) -> torch.Tensor:
        """a = W' y + b', (B, n_hidden) -> (B, n_visible); W' = Wᵀ when tied."""
        if self.W_prime is None:
            return F.linear(y, self.encoder.W.t(), self.b_prime)
        return F.linear(y, self.W_prime, self.b_prime)

    def decode(self, y: torch.Tensor) -> torch.Tensor:
        """z = s(W' y + b'): sigmoid for cross-entropy, identity for squared error."""
        a = self.decoder_logits(y)
        return torch.sigmoid(a) if self.loss == "cross_entropy" else a

    def reconstruction_loss(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``reconstruction_loss`` with this layer's loss: (B, n_visible) x and logits a."""
        return reconstruction_loss(x, a, self.loss)

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The training objective on a batch: corrupt, encode, decode, compare to clean x."""
        x_tilde = self.corrupt(x, generator) if self.training else x
        return self.reconstruction_loss(x, self.decoder_logits(self.encode(x_tilde)))
