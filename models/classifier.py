"""The deep classifier: hidden layers that *are* the pretrained encoders, topped by softmax.

Built from autoencoders it shares their ``EncoderLayer`` objects (not copies), as the
tutorial's ``SdA`` shares ``W`` and ``b`` between its dA layers and its sigmoid layers.
Built with ``random_init`` it is the baseline twin: same architecture, fresh weights.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from models.layers import EncoderLayer


class DeepClassifier(nn.Module):
    """x -> h_1 -> … -> h_L -> softmax(V h_L + c).

    The output layer starts at zero, as the tutorial's ``LogisticRegression`` does, in both
    twins, so that only the hidden layers' initial weights differ between them.

    Args:
        hidden: The hidden layers, bottom first. They are used as given (shared).
        n_classes: Output classes.
        dropout: Dropout probability applied to each hidden layer's output in training.
    """

    def __init__(self, hidden: Sequence[EncoderLayer], n_classes: int, dropout: float = 0.0):
        super().__init__()
        if not hidden:
            raise ValueError("a DeepClassifier needs at least one hidden layer")
        self.hidden = nn.ModuleList(hidden)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden[-1].n_hidden, n_classes)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    @classmethod
    def random_init(
        cls,
        n_visible: int,
        hidden_sizes: Sequence[int],
        n_classes: int,
        activation: str = "sigmoid",
        init: str = "tutorial",
        dropout: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ) -> "DeepClassifier":
        """The baseline: the same architecture with randomly initialised hidden layers."""
        sizes = [n_visible, *hidden_sizes]
        layers = [
            EncoderLayer(sizes[i], sizes[i + 1], activation, init, generator)
            for i in range(len(hidden_sizes))
        ]
        return cls(layers, n_classes, dropout)

    @classmethod
    def from_encoder_states(
        cls,
        states: Sequence[dict[str, torch.Tensor]],
        n_classes: int,
        activation: str = "sigmoid",
        dropout: float = 0.0,
    ) -> "DeepClassifier":
        """Build from pretrained encoder states (``{"linear.weight", "linear.bias"}`` each),
        e.g. loaded from the pretraining stage's checkpoints."""
        layers = []
        for k, state in enumerate(states):
            n_hidden, n_visible = state["linear.weight"].shape
            if layers and layers[-1].n_hidden != n_visible:
                raise ValueError(
                    f"encoder {k + 1} expects {n_visible} inputs but layer {k} has "
                    f"{layers[-1].n_hidden} units"
                )
            layer = EncoderLayer(n_visible, n_hidden, activation)
            layer.load_state_dict(state)
            layers.append(layer)
        return cls(layers, n_classes, dropout)

    def features(self, x: torch.Tensor, depth: Optional[int] = None) -> torch.Tensor:
        """The code of layer ``depth`` (all layers when None), without dropout."""
        for layer in self.hidden[:depth]:
            x = layer(x)  # (B, n_in) -> (B, n_out)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (B, n_visible) -> (B, n_classes)."""
        for layer in self.hidden:
            x = self.dropout(layer(x))
        return self.output(x)
