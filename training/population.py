"""Populations: P networks that differ only in their seeds, trained as one batched model.

An ablation over seeds trains many small networks, where the per-step cost of launching
kernels and running Python dominates the arithmetic. A population stacks the P members'
parameters along a leading axis, ``W`` of shape (P, n_hidden, n_visible), and runs one
batched matmul (``torch.baddbmm``) where P single runs would run P small ones.
``DAEPopulation`` lives here, ``ClassifierPopulation`` in ``training.classifier_population``;
the engine that trains them (``training.engine``; ``training.dae_training``,
``training.classifier_training``) runs every stage this way, a single run being a population
of one.

Member p is its run at P = 1, up to floating-point rounding:

- **initialisation**: a population is built *from* P single modules
  (``DenoisingAutoencoder`` or ``DeepClassifier``, each made with its own seeded generator),
  whose parameters are stacked, not re-drawn;
- **corruption noise**: member p draws its noise from its own generator, one draw of
  shape (B, n_visible) per step, as a plain loop calling ``DenoisingAutoencoder.corrupt``
  would (``models.corruption.corrupt_members``);
- **data order**: member p's epoch e is ``training.batches.epoch_permutation(n, seed_p, e)``,
  sliced into batches of the batch size (``training.batches.EpochChunks``; the last batch may
  be short);
- **loss**: the SUM over members of each member's mean loss, so that member p's gradient is
  exactly the gradient of its own loss (a mean over members would scale it by 1/P); any
  element-wise optimiser (SGD with momentum or weight decay, Adam) then updates member p as
  it would update the single model. With plain SGD both kinds skip autograd and
  ``torch.optim``: ``DAEPopulation.sgd_step`` and ``ClassifierPopulation.sgd_step`` write
  the same update straight into the weights from the gradient matmuls (less memory
  traffic, no autograd graph; tested equal to autograd);
- **dropout** (fine-tuning): member p's masks come from its own generator, drawn layer by
  layer as ``torch.nn.functional.dropout`` draws them on the CPU;
- **history and early stopping**: per-epoch metrics are batch-size-weighted means, and each
  member runs its own ``training.stopping_rules.EarlyStopping`` on its validation error. A member
  that stops is dropped from the batch (its parameters and optimiser state are sliced out)
  and keeps its best weights while the others go on.

The pipeline derives every member's seeds from its runtime seed with the purposes named in
``runtime.keys.Seed`` (initial weights, noise and data order per layer; the random twin's
weights, the twins' data order and dropout).

Not bit-identical: a batched matmul may sum in another order than P single ones, so a
member matches its single run to rounding (≈1e-6 relative in float32 after a few hundred
steps, ≈1e-15 in float64), not bit for bit. Dropout masks match the single run on the CPU
only (on CUDA ``F.dropout`` uses a fused kernel without a generator argument).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from models.corruption import corrupt_members
from models.dae import DenoisingAutoencoder, reconstruction_loss
from models.layers import LEAKY_SLOPE, activate, stack_members, stacked_linear

History = list[dict[str, float]]


def _same(values: Sequence[Any], what: str) -> Any:
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"population members must share {what}; got {sorted(set(values))}")
    return values[0]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (P, b) of a shared (N, D) or per-member (P, N, D) tensor -> (P, b, D)."""
    if x.dim() == 3:
        return x[torch.arange(len(idx), device=x.device).unsqueeze(1), idx]
    return x[idx]


def _activation_slope(y: torch.Tensor, activation: str) -> torch.Tensor:
    """s'(pre) from the output y = s(pre), as autograd takes it (0 at pre = 0 for relu)."""
    if activation == "sigmoid":
        return y * (1 - y)
    if activation == "linear":
        return torch.ones_like(y)
    if activation == "tanh":
        return 1 - y * y
    if activation == "relu":
        return (y > 0).to(y.dtype)
    if activation == "leaky_relu":
        return torch.where(y > 0, 1.0, LEAKY_SLOPE).to(y.dtype)
    raise ValueError(f"unknown activation {activation!r}")


def _cross_entropy_from_sigmoid(x: torch.Tensor, a: torch.Tensor,
                                z: torch.Tensor) -> torch.Tensor:
    """Per member, Σ_i [softplus(a_i) − x_i a_i] averaged over the batch: (P, B, D) -> (P,).

    ``reconstruction_loss``'s cross-entropy from the logits a, reusing z = sigmoid(a) that
    the gradient needs anyway: softplus(a) = max(a, 0) − log sigmoid(|a|) and
    sigmoid(|a|) = max(z, 1 − z). On a CPU this is 2.2 ms against 5.9 ms for
    ``binary_cross_entropy_with_logits`` at (32, 20, 784) (its log1p is not vectorised),
    and the same to rounding (1e-7 relative in float32, 1e-15 in float64).
    """
    per_pixel = torch.maximum(z, 1 - z).log_().neg_().add_(a.clamp(min=0))
    acc = wide(a.dtype)  # under autocast a and z are bf16 (3 significant digits per term)
    return (per_pixel.sum(dim=-1, dtype=acc).mean(dim=-1)
            - torch.linalg.vecdot(x.to(acc), a.to(acc)).mean(dim=-1))


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are kept in: float32 for bf16/fp16 terms, else ``dtype`` (float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def compute_copy(weight: torch.Tensor) -> torch.Tensor:
    """The weight the fused steps' matmuls use: under ``torch.autocast`` its copy in the
    autocast dtype, made once per step, else ``weight`` itself.

    Autocast casts a float32 operand at every use, and Lightning opens its region with
    ``cache_enabled=False`` (the fused steps change the weights in place, so a cached copy
    would go stale), so a weight used by the forward pass and again by the backward pass was
    cast twice per step (three times for a tied autoencoder's W). The values are the same:
    autocast's cast is this one.
    """
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return weight.to(torch.get_autocast_dtype(device))
    return weight


def descend(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, lr: float) -> None:
    """W ← W − lr · left @ right, in place: one SGD update from a gradient that is the
    batched product of (P, m, k) ``left`` and (P, k, n) ``right``.

    In float32 it is one ``baddbmm_`` (no gradient materialised). Under ``torch.autocast``
    (``bf16-mixed``) an in-place matmul is not autocast (it would mix float32 weights with
    bfloat16 operands and fail), so the product runs in bfloat16 through ``bmm``, as
    autograd's weight gradient does under autocast, and is subtracted from the float32
    master weights. (Widening the product to float32 first gives the same bits and is no
    faster: the pass is bound by memory traffic either way.)
    """
    if torch.is_autocast_enabled(weight.device.type):
        weight.sub_(torch.bmm(left, right), alpha=lr)  # (P, m, n) in bf16 -> fp32 weights
    else:
        weight.baddbmm_(left, right, alpha=-lr)


def batch_sum(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Σ_B of a (P, B, n) gradient in ``like``'s dtype (float32 sums of bf16 terms under
    autocast): the bias update."""
    return g.sum(dim=1, dtype=like.dtype)


def plain_sgd(settings: Mapping[str, Any]) -> bool:
    """SGD without momentum or weight decay: the update the populations' ``sgd_step`` fuse."""
    return (settings["name"] == "sgd" and not settings.get("momentum", 0.0)
            and not settings.get("weight_decay", 0.0))


class DAEPopulation(nn.Module):
    """P denoising autoencoders with stacked parameters, one equation per method.

    Shapes: ``W`` (P, n_hidden, n_visible), ``b`` (P, n_hidden), ``b_prime`` (P, n_visible),
    ``W_prime`` (P, n_visible, n_hidden) when untied.

    Args:
        daes: The members, built as single modules (their initial weights are stacked).
            They must share every hyperparameter; ``value_range`` may differ per member.
    """

    def __init__(self, daes: Sequence[DenoisingAutoencoder]):
        super().__init__()
        if not daes:
            raise ValueError("a population needs at least one member")
        self.P = len(daes)
        self.n_visible = _same([d.n_visible for d in daes], "n_visible")
        self.n_hidden = _same([d.n_hidden for d in daes], "n_hidden")
        self.activation = _same([d.encoder.activation for d in daes], "activation")
        self.noise = _same([d.noise for d in daes], "noise")
        self.corruption_level = _same([d.corruption_level for d in daes], "corruption_level")
        self.loss = _same([d.loss for d in daes], "loss")
        self.tied = _same([d.tied for d in daes], "tied weights")
        self.value_ranges = [tuple(d.value_range) for d in daes]
        self.W = stack_members([d.encoder.W for d in daes])
        self.b = stack_members([d.encoder.linear.bias for d in daes])
        self.b_prime = stack_members([d.b_prime for d in daes])
        self.W_prime = None if self.tied else stack_members([d.W_prime for d in daes])

    def corrupt(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """x̃_p ~ q(x̃ | x_p), member p's noise from ``generators[p]``: (P, B, D) -> (P, B, D)."""
        return corrupt_members(x, self.noise, self.corruption_level, generators,
                               self.value_ranges)

    def encode(self, x: torch.Tensor, W: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y = s(W x + b): (P, B, n_visible) or shared (B, n_visible) -> (P, B, n_hidden).
        ``W``: the weight to use instead of ``self.W`` (the fused step's ``compute_copy``)."""
        return activate(stacked_linear(x, self.W if W is None else W, self.b), self.activation)

    def decoder_logits(self, y: torch.Tensor) -> torch.Tensor:
        """a = W' y + b', W' = Wᵀ when tied: (P, B, n_hidden) -> (P, B, n_visible)."""
        if self.W_prime is None:
            return torch.baddbmm(self.b_prime.unsqueeze(1), y, self.W)
        return torch.baddbmm(self.b_prime.unsqueeze(1), y, self.W_prime.transpose(1, 2))

    def reconstruction_loss(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Per member, ``models.dae.reconstruction_loss``: (P,). Without autograd the
        cross-entropy takes the faster, equal-to-rounding ``_cross_entropy_from_sigmoid``."""
        x = x.expand(a.shape)
        if self.loss == "cross_entropy" and not (torch.is_grad_enabled() and a.requires_grad):
            return _cross_entropy_from_sigmoid(x, a, torch.sigmoid(a))  # validation: faster
        return reconstruction_loss(x, a, self.loss)

    def forward(self, x: torch.Tensor,
                generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
        """Per-member training objective (P,): corrupt (in training), encode, decode."""
        x_tilde = self.corrupt(x, generators) if self.training and generators else x
        return self.reconstruction_loss(x, self.decoder_logits(self.encode(x_tilde)))

    @torch.no_grad()
    def sgd_step(self, x: torch.Tensor, generators: Sequence[torch.Generator],
                 lr: float) -> torch.Tensor:
        """One plain-SGD step of every member by hand, the update fused into the matmuls
        that compute the gradient; returns the per-member losses (P,) before the step.

        With a = W' y + b', y = s(W x̃ + b) and L = mean_B Σ_i ℓ(x_i, a_i):
        ∂L/∂a = (sigmoid(a) − x)/B (cross-entropy) or 2(a − x)/B (squared error);
        ∂L/∂b' = Σ_B ∂L/∂a; ∂L/∂y = ∂L/∂a W'ᵀ; ∂L/∂pre = ∂L/∂y ⊙ s'(pre); ∂L/∂b = Σ_B ∂L/∂pre;
        ∂L/∂W = ∂L/∂preᵀ x̃ (+ ∂L/∂aᵀ y when tied, W' = Wᵀ), ∂L/∂W' = ∂L/∂aᵀ y when untied.
        ``W.baddbmm_(…, alpha=−lr)`` subtracts each term without materialising a gradient:
        on a CPU the (P, n_hidden, n_visible) gradients, their sum and the optimiser's pass
        cost as much memory traffic as the matmuls (docs/benchmarks.md). Tied, both terms are one matmul over the stacked batch,
        [∂L/∂pre, y]ᵀ [x̃; ∂L/∂a], so W is read and written once per step, not twice.
        Every activation is kept (P, B, ·), batch before features: on a CPU ``bmm`` is
        slower when its output is the transposed (P, n_hidden, B). Equal to autograd + ``torch.optim.SGD`` up to rounding.
        """
        x_tilde = self.corrupt(x, generators)  # (P, B, V)
        W = compute_copy(self.W)  # cast once per step under autocast
        y = self.encode(x_tilde, W)  # (P, B, H)
        W_dec = W if self.W_prime is None else compute_copy(self.W_prime).transpose(1, 2)
        a = torch.baddbmm(self.b_prime.unsqueeze(1), y, W_dec)  # (P, B, V) logits
        B = x.shape[1]
        if self.loss == "cross_entropy":
            z = torch.sigmoid(a)
            loss = _cross_entropy_from_sigmoid(x, a, z)
            da = z.sub_(x).div_(B)
        else:
            loss = self.reconstruction_loss(x, a)
            da = (a - x).mul_(2 / B)
        # (P, B, V) @ (P, V, H) -> (P, B, H), computed before W changes
        dpre = torch.bmm(da, W_dec.transpose(1, 2)).mul_(_activation_slope(y, self.activation))
        self.b_prime.sub_(batch_sum(da, self.b_prime), alpha=lr)
        self.b.sub_(batch_sum(dpre, self.b), alpha=lr)
        if self.W_prime is None:  # ∂L/∂preᵀ x̃ + (∂L/∂aᵀ y)ᵀ as one (P, H, 2B) @ (P, 2B, V)
            descend(self.W, torch.cat([dpre, y], dim=1).transpose(1, 2),
                    torch.cat([x_tilde.to(da.dtype), da], dim=1), lr)
        else:
            descend(self.W, dpre.transpose(1, 2), x_tilde, lr)  # encoder: ∂L/∂preᵀ x̃
            descend(self.W_prime, da.transpose(1, 2), y, lr)  # decoder: ∂L/∂aᵀ y
        return loss

    def member_state(self, p: int) -> dict[str, torch.Tensor]:
        """Member p as a ``DenoisingAutoencoder`` state dict (copies)."""
        state = {
            "encoder.linear.weight": self.W[p], "encoder.linear.bias": self.b[p],
            "b_prime": self.b_prime[p],
        }
        if self.W_prime is not None:
            state["W_prime"] = self.W_prime[p]
        return {k: v.detach().clone() for k, v in state.items()}

    def select(self, keep: torch.Tensor) -> None:
        """Keep only members ``keep`` (indices), e.g. to drop stopped ones."""
        for name, param in list(self.named_parameters()):
            setattr(self, name, nn.Parameter(param.detach()[keep].clone()))
        self.value_ranges = [self.value_ranges[i] for i in keep.tolist()]
        self.P = len(keep)
