"""The deep autoencoder (Hinton & Salakhutdinov 2006): a stack of encoders unrolled into an
encoder and a mirrored decoder, fine-tuned end to end on reconstruction.

Sizes n_0 = D (the input), n_1 … n_L (n_L the code). Encoder layer l maps n_l -> n_{l+1};
decoder layer l mirrors it, n_{l+1} -> n_l::

    h_{l+1} = s_l(W_l h_l + b_l)              encode, l = 0 … L−1 (s_{L−1} may be linear)
    ĥ_l     = s_{l−1}(W'_l ĥ_{l+1} + b'_l)    decode, l = L−1 … 1, ĥ_L = h_L
    z       = σ(W'_0 ĥ_1 + b'_0)              (identity instead of σ for squared error)

Unrolled from pretrained denoising autoencoders, W_l and b_l are layer l's encoder and
W'_l, b'_l its decoder (W'_l = W_lᵀ for a tied one): the decoder mirrors the encoder at the
start of fine-tuning. With ``tied`` the decoder keeps W'_l = W_lᵀ while fine-tuning.

A member's weights are a flat state dict (``encoder.l.weight`` (n_{l+1}, n_l),
``encoder.l.bias``, ``decoder.l.weight`` (n_l, n_{l+1}) when untied, ``decoder.l.bias``);
``AutoencoderPopulation`` stacks P of them (``models.layers.stack_members``), as the
engine's populations do (``training.population``), a single autoencoder being P = 1.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from models.dae import reconstruction_loss
from models.layers import activate, init_weight_, stack_members, stacked_linear

State = dict[str, torch.Tensor]


def unrolled_state(dae_states: Sequence[State], tied: bool) -> State:
    """A member unrolled from pretrained dA states (``DenoisingAutoencoder`` state dicts),
    bottom first: encoder l is dA l's encoder, decoder l its decoder (copied; W'_l = W_lᵀ
    when the dA was tied)."""
    state: State = {}
    for l, dae in enumerate(dae_states):
        w = dae["encoder.linear.weight"]  # (n_{l+1}, n_l)
        state[f"encoder.{l}.weight"] = w.clone()
        state[f"encoder.{l}.bias"] = dae["encoder.linear.bias"].clone()
        state[f"decoder.{l}.bias"] = dae["b_prime"].clone()  # (n_l,)
        if not tied:
            state[f"decoder.{l}.weight"] = dae.get("W_prime", w.t()).clone()  # (n_l, n_{l+1})
    return state


def random_state(sizes: Sequence[int], activations: Sequence[str], init: str, tied: bool,
                 generator: Optional[torch.Generator] = None) -> State:
    """A member of the same shape at random: weights by ``init`` (``models.layers``), the
    decoder's drawn after the encoder's as ``DenoisingAutoencoder`` draws W', biases 0.

    Args:
        sizes: n_0 … n_L.
        activations: s_0 … s_{L−1}, the units of each encoder layer.
        init: Initialisation scheme.
        tied: No decoder weights of its own.
        generator: Source of the weights.
    """
    state: State = {}
    for l, act in enumerate(activations):
        w = torch.empty(sizes[l + 1], sizes[l])
        init_weight_(w, init, act, generator)
        state[f"encoder.{l}.weight"], state[f"encoder.{l}.bias"] = w, torch.zeros(sizes[l + 1])
        state[f"decoder.{l}.bias"] = torch.zeros(sizes[l])
        if not tied:
            w_prime = torch.empty(sizes[l], sizes[l + 1])
            init_weight_(w_prime, init, act, generator)
            state[f"decoder.{l}.weight"] = w_prime
    return state


def squared_error(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The paper's error: E = Σ_i (x_i − z_i)², summed over pixels and averaged over images,
    (…, B, D) -> (…) (per member for (P, B, D))."""
    return ((x - z) ** 2).sum(dim=-1).mean(dim=-1)


class AutoencoderPopulation(nn.Module):
    """P deep autoencoders with stacked parameters: ``enc_w[l]`` (P, n_{l+1}, n_l),
    ``enc_b[l]`` (P, n_{l+1}), ``dec_w[l]`` (P, n_l, n_{l+1}) when untied, ``dec_b[l]``
    (P, n_l).

    Args:
        states: One member state each (``unrolled_state`` or ``random_state``); all of one
            shape, all tied or all untied.
        activations: s_0 … s_{L−1}, the encoder layers' units (decoder layer l > 0 uses
            s_{l−1}, the units of the h_l it reconstructs).
        loss: ``cross_entropy`` (sigmoid output) or ``squared_error`` (linear output).
    """

    def __init__(self, states: Sequence[State], activations: Sequence[str], loss: str):
        super().__init__()
        if not states:
            raise ValueError("a population needs at least one member")
        L = len(activations)
        self.P, self.activations, self.loss = len(states), list(activations), loss
        self.tied = "decoder.0.weight" not in states[0]
        if any(("decoder.0.weight" not in s) != self.tied for s in states):
            raise ValueError("population members must all be tied or all untied")

        def stacked(part: str, kind: str) -> nn.ParameterList:
            return nn.ParameterList([stack_members([s[f"{part}.{l}.{kind}"] for s in states])
                                     for l in range(L)])

        self.enc_w, self.enc_b = stacked("encoder", "weight"), stacked("encoder", "bias")
        self.dec_b = stacked("decoder", "bias")
        self.dec_w = None if self.tied else stacked("decoder", "weight")

    @property
    def code_size(self) -> int:
        return self.enc_w[-1].shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code h_L: (P, B, n_0) or shared (B, n_0) -> (P, B, n_L)."""
        h = x
        for w, b, act in zip(self.enc_w, self.enc_b, self.activations):
            h = activate(stacked_linear(h, w, b), act)  # (P, B, n_l) -> (P, B, n_{l+1})
        return h

    def decoder_weight(self, l: int) -> torch.Tensor:
        """W'_l, (P, n_l, n_{l+1}): W_lᵀ when tied."""
        return self.enc_w[l].transpose(1, 2) if self.tied else self.dec_w[l]

    def decoder_logits(self, h: torch.Tensor) -> torch.Tensor:
        """a = W'_0 ĥ_1 + b'_0 from the code: (P, B, n_L) -> (P, B, n_0)."""
        for l in reversed(range(len(self.activations))):
            # (P, B, n_{l+1}) -> (P, B, n_l)
            a = stacked_linear(h, self.decoder_weight(l), self.dec_b[l])
            if l > 0:
                h = activate(a, self.activations[l - 1])
        return a

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """z: σ(a) for cross-entropy, a for squared error, (P, B, n_L) -> (P, B, n_0)."""
        return self.output(self.decoder_logits(h))

    def output(self, a: torch.Tensor) -> torch.Tensor:
        """z from the output logits a."""
        return torch.sigmoid(a) if self.loss == "cross_entropy" else a

    def reconstruction_loss(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """``models.dae.reconstruction_loss`` per member, (P,), from the output logits."""
        return reconstruction_loss(x, a, self.loss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fine-tuning objective per member (P,): encode, decode, compare to x."""
        return self.reconstruction_loss(x, self.decoder_logits(self.encode(x)))

    def member_state(self, p: int) -> State:
        """Member p's flat state dict (copies)."""
        state: State = {}
        for l in range(len(self.activations)):
            state[f"encoder.{l}.weight"] = self.enc_w[l][p]
            state[f"encoder.{l}.bias"] = self.enc_b[l][p]
            state[f"decoder.{l}.bias"] = self.dec_b[l][p]
            if not self.tied:
                state[f"decoder.{l}.weight"] = self.dec_w[l][p]
        return {k: v.detach().clone() for k, v in state.items()}

    def select(self, keep: torch.Tensor) -> None:
        """Keep only members ``keep`` (indices), e.g. to drop stopped ones."""
        for plist in (self.enc_w, self.enc_b, self.dec_b, *([] if self.tied else [self.dec_w])):
            for i, param in enumerate(plist):
                plist[i] = nn.Parameter(param.detach()[keep].clone())
        self.P = len(keep)


def single(state: State, activations: Sequence[str], loss: str) -> AutoencoderPopulation:
    """One autoencoder (P = 1) from its state, in evaluation mode."""
    return AutoencoderPopulation([state], activations, loss).eval()
