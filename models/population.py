"""Populations: P networks that differ only in their seeds, trained as one batched model.

An ablation over seeds trains many small networks, where the per-step cost of launching
kernels and running Python dominates the arithmetic. A population stacks the P members'
parameters along a leading axis, ``W`` of shape (P, n_hidden, n_visible), and runs one
batched matmul (``torch.baddbmm``) where P single runs would run P small ones.

Member p is the same seed trained alone, up to floating-point rounding:

- **initialisation**: a population is built *from* P single modules
  (``DenoisingAutoencoder`` or ``DeepClassifier``, each made with its own seeded generator),
  whose parameters are stacked, not re-drawn;
- **corruption noise**: member p draws its noise from its own generator, one
  ``models.corruption.corrupt`` call of shape (B, n_visible) per step, the order in which
  ``LitDenoisingAutoencoder`` draws it;
- **data order**: member p's epoch e is ``models.batches.epoch_permutation(n, seed_p, e)``,
  sliced into batches as ``models.batches.DeviceBatches`` does (the last batch may be short);
- **loss**: the SUM over members of each member's mean loss, so that member p's gradient is
  exactly the gradient of its own loss (a mean over members would scale it by 1/P); any
  element-wise optimiser (SGD with momentum or weight decay, Adam) then updates member p as
  it would update the single model. With plain SGD the autoencoders skip autograd and
  ``torch.optim``: ``DAEPopulation.sgd_step`` writes the same update straight into the
  weights from the gradient matmuls (less memory traffic; tested equal to autograd);
- **dropout** (fine-tuning): member p's masks come from its own generator, drawn layer by
  layer as ``torch.nn.functional.dropout`` draws them on the CPU;
- **history and early stopping**: per-epoch metrics are the batch-size-weighted means that
  Lightning's ``self.log(on_epoch=True)`` computes, and each member runs
  ``models.callbacks.TutorialEarlyStopping``'s rule on its own validation error. A member
  that stops is dropped from the batch (its parameters and optimiser state are sliced out)
  and keeps its best weights while the others go on.

The pipeline's seeds for runtime seed s and layer k are ``derive_seed(s, "pretrain-init", k)``,
``derive_seed(s, "pretrain-noise", k)`` and ``derive_seed(s, "pretrain-order", k)``
(``tasks.runtime``); for fine-tuning ``derive_seed(s, "random-init")``,
``derive_seed(s, "finetune-order")`` and ``derive_seed(s, "finetune-dropout")``.

Not bit-identical: a batched matmul may sum in another order than P single ones, so a
member matches its single run to rounding (≈1e-6 relative in float32 after a few hundred
steps, ≈1e-15 in float64), not bit for bit. Dropout masks match the single run on the CPU
only (on CUDA ``F.dropout`` uses a fused kernel without a generator argument).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from models.batches import epoch_permutation
from models.classifier import DeepClassifier
from models.corruption import corrupt as corrupt_fn
from models.dae import DenoisingAutoencoder
from models.layers import LEAKY_SLOPE, activate
from models.optim import build_optimizer

History = list[dict[str, float]]


def _stack(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).clone())


def _same(values: Sequence[Any], what: str) -> Any:
    if any(v != values[0] for v in values[1:]):
        raise ValueError(f"population members must share {what}; got {sorted(set(values))}")
    return values[0]


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (P, b) of a shared (N, D) or per-member (P, N, D) tensor -> (P, b, D)."""
    if x.dim() == 3:
        return x[torch.arange(len(idx), device=x.device).unsqueeze(1), idx]
    return x[idx]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y_p = x_p W_pᵀ + b_p for every member: (P, B, n_in) -> (P, B, n_out).

    Computed as yᵀ = W xᵀ + b, so that the weight's gradient, dyᵀ x, comes out in W's own
    (P, n_out, n_in) layout: with y = x Wᵀ it comes out transposed, and autograd then copies
    it into W's layout, a strided copy that cost more than the matmuls (measured on a CPU).
    A shared input (B, n_in) is one (B, n_in) @ (n_in, P·n_out) GEMM instead of P.
    """
    if x.dim() == 2:
        P, n_out, n_in = weight.shape
        y = torch.addmm(bias.reshape(1, -1), x, weight.reshape(P * n_out, n_in).t())
        return y.view(len(x), P, n_out).transpose(0, 1)
    return torch.baddbmm(bias.unsqueeze(2), weight, x.transpose(1, 2)).transpose(1, 2)


def _activation_slope(y: torch.Tensor, activation: str) -> torch.Tensor:
    """s'(pre) from the output y = s(pre), as autograd takes it (0 at pre = 0 for relu)."""
    if activation == "sigmoid":
        return y * (1 - y)
    if activation == "tanh":
        return 1 - y * y
    if activation == "relu":
        return (y > 0).to(y.dtype)
    if activation == "leaky_relu":
        return torch.where(y > 0, 1.0, LEAKY_SLOPE).to(y.dtype)
    raise ValueError(f"unknown activation {activation!r}")


def plain_sgd(settings: Mapping[str, Any]) -> bool:
    """SGD without momentum or weight decay: the update ``DAEPopulation.sgd_step`` fuses."""
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
        self.W = _stack([d.encoder.W for d in daes])
        self.b = _stack([d.encoder.linear.bias for d in daes])
        self.b_prime = _stack([d.b_prime for d in daes])
        self.W_prime = None if self.tied else _stack([d.W_prime for d in daes])

    def corrupt(self, x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """x̃_p ~ q(x̃ | x_p), member p's noise from ``generators[p]``: (P, B, D) -> (P, B, D)."""
        return torch.stack([
            corrupt_fn(x[p], self.noise, self.corruption_level, g, self.value_ranges[p])
            for p, g in enumerate(generators)
        ])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """y = s(W x + b): (P, B, n_visible) or shared (B, n_visible) -> (P, B, n_hidden)."""
        return activate(_linear(x, self.W, self.b), self.activation)

    def decoder_logits(self, y: torch.Tensor) -> torch.Tensor:
        """a = W' y + b', W' = Wᵀ when tied: (P, B, n_hidden) -> (P, B, n_visible)."""
        if self.W_prime is None:
            return torch.baddbmm(self.b_prime.unsqueeze(1), y, self.W)
        return torch.baddbmm(self.b_prime.unsqueeze(1), y, self.W_prime.transpose(1, 2))

    def reconstruction_loss(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Per member, L(x, z) summed over features and averaged over the batch: (P,).

        The definition of ``DenoisingAutoencoder.reconstruction_loss`` (cross-entropy from
        the logits, or squared error), reduced over the last two axes only.
        """
        if x.dim() == 2:
            x = x.expand(a.shape)
        if self.loss == "cross_entropy":
            per_pixel = F.binary_cross_entropy_with_logits(a, x, reduction="none")
        else:
            per_pixel = (x - a) ** 2
        return per_pixel.sum(dim=-1).mean(dim=-1)

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
        cost as much memory traffic as the matmuls (measured: 20-25% of a 784→256 step at
        P=32). Equal to autograd + ``torch.optim.SGD`` up to rounding.
        """
        x_tilde = self.corrupt(x, generators)
        preT = torch.baddbmm(self.b.unsqueeze(2), self.W, x_tilde.transpose(1, 2))  # (P, H, B)
        yT = activate(preT, self.activation)
        y = yT.transpose(1, 2)  # (P, B, H)
        W_dec = self.W if self.W_prime is None else self.W_prime.transpose(1, 2)  # (P, H, V)
        a = torch.baddbmm(self.b_prime.unsqueeze(1), y, W_dec)  # (P, B, V)
        loss = self.reconstruction_loss(x, a)
        B = x.shape[1]
        if self.loss == "cross_entropy":
            da = (torch.sigmoid(a) - x).div_(B)
        else:
            da = (a - x).mul_(2 / B)
        dpreT = torch.bmm(W_dec, da.transpose(1, 2)).mul_(_activation_slope(yT, self.activation))
        self.b_prime.sub_(da.sum(dim=1), alpha=lr)
        self.b.sub_(dpreT.sum(dim=2), alpha=lr)
        self.W.baddbmm_(dpreT, x_tilde, alpha=-lr)  # encoder: ∂L/∂preᵀ x̃
        if self.W_prime is None:
            self.W.baddbmm_(yT, da, alpha=-lr)  # tied decoder: (∂L/∂aᵀ y)ᵀ = yᵀ ∂L/∂a
        else:
            self.W_prime.baddbmm_(da.transpose(1, 2), y, alpha=-lr)
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


class ClassifierPopulation(nn.Module):
    """P deep classifiers with stacked parameters.

    ``weights[l]`` is (P, n_out, n_in) and ``biases[l]`` (P, n_out) for hidden layer l;
    ``out_weight`` (P, n_classes, n_hidden_L) and ``out_bias`` (P, n_classes).

    Args:
        classifiers: The members, built as single ``DeepClassifier``s (random or pretrained
            hidden layers); they must share architecture, activation and dropout.
    """

    def __init__(self, classifiers: Sequence[DeepClassifier]):
        super().__init__()
        if not classifiers:
            raise ValueError("a population needs at least one member")
        self.P = len(classifiers)
        shapes = [tuple(tuple(l.W.shape) for l in c.hidden) + (tuple(c.output.weight.shape),)
                  for c in classifiers]
        _same(shapes, "layer shapes")
        self.activation = _same([l.activation for c in classifiers for l in c.hidden],
                                "activation")
        self.dropout = _same([c.dropout.p for c in classifiers], "dropout")
        n_layers = len(classifiers[0].hidden)
        self.weights = nn.ParameterList(
            [_stack([c.hidden[l].W for c in classifiers]) for l in range(n_layers)])
        self.biases = nn.ParameterList(
            [_stack([c.hidden[l].linear.bias for c in classifiers]) for l in range(n_layers)])
        self.out_weight = _stack([c.output.weight for c in classifiers])
        self.out_bias = _stack([c.output.bias for c in classifiers])

    def _dropout(self, h: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """``F.dropout``'s CPU arithmetic with member p's mask drawn from ``generators[p]``:
        noise ~ Bernoulli(1−p) of shape (B, n), divided by 1−p, times h."""
        q = 1 - self.dropout
        noise = torch.stack([
            torch.empty(h.shape[1:], dtype=h.dtype, device=h.device).bernoulli_(q, generator=g)
            for g in generators
        ])
        return h * noise.div_(q)

    def forward(self, x: torch.Tensor,
                generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
        """Class logits: (P, B, D) or shared (B, D) -> (P, B, n_classes)."""
        drop = self.training and self.dropout > 0
        if drop and generators is None:
            raise ValueError("dropout needs one generator per member")
        h = x
        for weight, bias in zip(self.weights, self.biases):
            h = activate(_linear(h, weight, bias), self.activation)  # (P, B, n_in) -> (P, B, n_out)
            if drop:
                h = self._dropout(h, generators)
        return _linear(h, self.out_weight, self.out_bias)

    def member_state(self, p: int) -> dict[str, torch.Tensor]:
        """Member p as a ``DeepClassifier`` state dict (copies)."""
        state: dict[str, torch.Tensor] = {}
        for l, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            state[f"hidden.{l}.linear.weight"] = weight[p]
            state[f"hidden.{l}.linear.bias"] = bias[p]
        state["output.weight"], state["output.bias"] = self.out_weight[p], self.out_bias[p]
        return {k: v.detach().clone() for k, v in state.items()}

    def select(self, keep: torch.Tensor) -> None:
        """Keep only members ``keep`` (indices), e.g. to drop stopped ones."""
        for plist in (self.weights, self.biases):
            for i, param in enumerate(plist):
                plist[i] = nn.Parameter(param.detach()[keep].clone())
        self.out_weight = nn.Parameter(self.out_weight.detach()[keep].clone())
        self.out_bias = nn.Parameter(self.out_bias.detach()[keep].clone())
        self.P = len(keep)


@dataclass
class PopulationResult:
    """Per-member outcome of a population run, in the single-model formats.

    Attributes:
        states: Member p's final weights as a ``DenoisingAutoencoder`` / ``DeepClassifier``
            state dict on the CPU (the best validation weights for classifiers).
        histories: Member p's per-epoch rows, keyed like ``models.callbacks.EpochHistory``
            (``epoch``, ``step``, then ``recon_loss``, ``val_recon_loss`` or ``train_loss``,
            ``train_error``, ``val_loss``, ``val_error``).
        best_val_error, best_epoch, stopped_early: ``TutorialEarlyStopping.summary()`` per
            member (classifiers only).
        seconds: Wall time of the training loop.
    """

    states: list[dict[str, torch.Tensor]]
    histories: list[History]
    best_val_error: list[float] = field(default_factory=list)
    best_epoch: list[int] = field(default_factory=list)
    stopped_early: list[bool] = field(default_factory=list)
    seconds: float = 0.0


def _generators(seeds: Optional[Sequence[int]], device: torch.device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds or []]


def _check_seeds(P: int, **seeds: Optional[Sequence[int]]) -> None:
    for name, values in seeds.items():
        if values is not None and len(values) != P:
            raise ValueError(f"{name} has {len(values)} seeds for {P} members")


def _batches(n: int, order_seeds: Sequence[int], epoch: int, batch_size: int,
             device: torch.device):
    """Per-member index batches (P, b) of one epoch, as ``DeviceBatches`` slices them."""
    order = torch.stack([epoch_permutation(n, s, epoch) for s in order_seeds]).to(device)
    for start in range(0, n, batch_size):
        yield order[:, start : start + batch_size]


def _slice_optimizer(old_params, new_params, optimizer, settings, keep):
    """A fresh optimiser over ``new_params`` carrying the members ``keep`` of the state."""
    new_opt = build_optimizer(new_params, settings)
    for old, new in zip(old_params, new_params):
        state = optimizer.state.get(old)
        if state:
            new_opt.state[new] = {
                k: v[keep].clone() if torch.is_tensor(v) and v.dim() > 0 else v
                for k, v in state.items()
            }
    return new_opt


def _check_finite(total: torch.Tensor, members: Sequence[int], stage: str, epoch: int) -> None:
    bad = [m for m, ok in zip(members, torch.isfinite(total).tolist()) if not ok]
    if bad:
        raise FloatingPointError(f"{stage}: the loss of member(s) {bad} became non-finite "
                                 f"in epoch {epoch}")


def train_dae_population(
    daes: Sequence[DenoisingAutoencoder],
    x_train: torch.Tensor,
    x_valid: Optional[torch.Tensor],
    *,
    noise_seeds: Sequence[int],
    order_seeds: Sequence[int],
    epochs: int,
    batch_size: int,
    optimizer: Mapping[str, Any],
    eval_batch_size: int = 4096,
    fused: Optional[bool] = None,
) -> PopulationResult:
    """Pretrain P autoencoders at once; member p as ``LitDenoisingAutoencoder(daes[p],
    seed=noise_seeds[p])`` with ``TensorDataModule(..., seed=order_seeds[p])`` would.

    Args:
        daes: Single modules, one per member, already initialised from their seeds.
        x_train: Clean inputs, shared (N, D) or per member (P, N, D) (deeper layers: each
            member's own codes), on the training device.
        x_valid: Clean validation inputs, same layout, or None.
        noise_seeds: Seed of member p's corruption generator.
        order_seeds: Seed of member p's data order.
        epochs: Epochs (no early stopping in pretraining).
        batch_size: Minibatch size.
        optimizer: ``models.optim.build_optimizer`` settings.
        eval_batch_size: Validation batch size (as ``TensorDataModule``'s).
        fused: Use ``DAEPopulation.sgd_step`` (plain SGD only) instead of autograd and
            ``torch.optim``; None: whenever the optimiser is plain SGD.
    """
    if fused is None:
        fused = plain_sgd(optimizer)
    elif fused and not plain_sgd(optimizer):
        raise ValueError("fused=True needs plain SGD (no momentum, no weight decay)")
    P = len(daes)
    _check_seeds(P, noise_seeds=noise_seeds, order_seeds=order_seeds)
    device = x_train.device
    pop = DAEPopulation(daes).to(device).train()
    opt = None if fused else build_optimizer(pop.parameters(), optimizer)
    noise = _generators(noise_seeds, device)
    n = x_train.shape[-2]
    histories: list[History] = [[] for _ in range(P)]
    step, started = 0, time.perf_counter()
    for epoch in range(epochs):
        total = torch.zeros(P, dtype=x_train.dtype, device=device)  # Σ_b loss_b · |b|
        for idx in _batches(n, order_seeds, epoch, batch_size, device):
            x = _gather(x_train, idx)  # (P, b, D), clean
            if opt is None:
                loss = pop.sgd_step(x, noise, optimizer["lr"])  # (P,) each member's mean loss
            else:
                loss = pop(x, noise)  # (P,) each member's mean loss
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()  # the sum keeps each member's gradient its own
                opt.step()
            total = total + loss.detach() * idx.shape[1]
            step += 1
        _check_finite(total, range(P), "pretrain population", epoch)
        rows = [{"epoch": epoch, "step": step, "recon_loss": v}
                for v in (total / n).tolist()]
        if x_valid is not None:
            for row, v in zip(rows, _dae_valid_loss(pop, x_valid, eval_batch_size).tolist()):
                row["val_recon_loss"] = v
        for p in range(P):
            histories[p].append(rows[p])
    seconds = time.perf_counter() - started
    states = [{k: v.cpu() for k, v in pop.member_state(p).items()} for p in range(P)]
    return PopulationResult(states=states, histories=histories, seconds=seconds)


#: Validation runs P members on a chunk at once; sub-chunks keep (P, rows, width) under this.
EVAL_ELEMENTS = 1 << 24


def _sub_chunks(start: int, stop: int, P: int, width: int):
    rows = max(1, EVAL_ELEMENTS // (P * width))
    for s in range(start, stop, rows):
        yield s, min(s + rows, stop)


@torch.no_grad()
def _dae_valid_loss(pop: DAEPopulation, x_valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """Clean reconstruction loss per member (P,), the batch-weighted mean over chunks of
    ``chunk`` examples, as Lightning's epoch-level ``self.log`` averages it."""
    was_training = pop.training
    pop.eval()
    n = x_valid.shape[-2]
    width = max(pop.n_visible, pop.n_hidden)
    total = torch.zeros(pop.P, dtype=x_valid.dtype, device=x_valid.device)
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        summed = torch.zeros_like(total)  # Σ over the chunk of per-example losses
        for s, e in _sub_chunks(start, start + b, pop.P, width):
            summed += pop(x_valid[..., s:e, :]) * (e - s)
        total = total + summed / b * b
    pop.train(was_training)
    return total / n


def train_classifier_population(
    classifiers: Sequence[DeepClassifier],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_valid: torch.Tensor,
    y_valid: torch.Tensor,
    *,
    order_seeds: Sequence[int],
    max_epochs: int,
    batch_size: int,
    optimizer: Mapping[str, Any],
    early_stopping: str = "tutorial",
    patience_batches: int = 10,
    patience_increase: float = 2.0,
    improvement_threshold: float = 0.995,
    patience_epochs: int = 10,
    dropout_seeds: Optional[Sequence[int]] = None,
    eval_batch_size: int = 4096,
) -> PopulationResult:
    """Fine-tune P classifiers at once, each with ``TutorialEarlyStopping``'s rule.

    Member p behaves as ``LitClassifier(classifiers[p])`` fitted with
    ``TensorDataModule(..., seed=order_seeds[p])`` and the callbacks ``EpochHistory`` and
    ``TutorialEarlyStopping(rule=early_stopping, ...)``: a member stops when its rule says
    so, is dropped from the batch, and ends with its best validation weights.

    Args:
        classifiers: Single modules, one per member (random or pretrained hidden layers).
        x_train, y_train: Shared training data (N, D), (N,) on the training device.
        x_valid, y_valid: Shared validation data.
        order_seeds: Seed of member p's data order.
        max_epochs: Epoch budget.
        batch_size: Minibatch size.
        optimizer: ``models.optim.build_optimizer`` settings.
        early_stopping, patience_batches, patience_increase, improvement_threshold,
            patience_epochs: As ``models.callbacks.TutorialEarlyStopping``.
        dropout_seeds: Seed of member p's dropout masks (as ``torch.manual_seed`` before a
            single run); required when the classifiers use dropout.
        eval_batch_size: Validation batch size (as ``TensorDataModule``'s).
    """
    if early_stopping not in ("tutorial", "patience", "none"):
        raise ValueError(f"unknown early-stopping rule {early_stopping!r}")
    P = len(classifiers)
    _check_seeds(P, order_seeds=order_seeds, dropout_seeds=dropout_seeds)
    device = x_train.device
    pop = ClassifierPopulation(classifiers).to(device).train()
    if pop.dropout > 0 and dropout_seeds is None:
        raise ValueError("the classifiers use dropout: give dropout_seeds")
    opt = build_optimizer(pop.parameters(), optimizer)
    dropout = _generators(dropout_seeds, device) if pop.dropout > 0 else None
    n = len(x_train)
    n_batches = math.ceil(n / batch_size)
    members = list(range(P))  # original index of each row of the (shrinking) population
    seeds = list(order_seeds)
    histories: list[History] = [[] for _ in range(P)]
    best = [math.inf] * P
    best_epoch, stopped = [-1] * P, [False] * P
    best_state: list[Optional[dict[str, torch.Tensor]]] = [None] * P
    final_state: list[Optional[dict[str, torch.Tensor]]] = [None] * P
    patience = [patience_batches * n_batches] * P
    stale = [0] * P
    step, started = 0, time.perf_counter()
    for epoch in range(max_epochs):
        Pa = len(members)
        loss_sum = torch.zeros(Pa, dtype=x_train.dtype, device=device)
        error_sum = torch.zeros(Pa, dtype=x_train.dtype, device=device)
        for idx in _batches(n, seeds, epoch, batch_size, device):
            x, y = x_train[idx], y_train[idx]  # (Pa, b, D), (Pa, b)
            logits = pop(x, dropout)  # (Pa, b, C)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(),
                                   reduction="none").view(y.shape).mean(dim=1)  # (Pa,)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()  # the sum keeps each member's gradient its own
            opt.step()
            with torch.no_grad():
                b = y.shape[1]
                loss_sum = loss_sum + loss * b
                error_sum = error_sum + (logits.argmax(dim=2) != y).to(x.dtype).mean(dim=1) * b
            step += 1
        _check_finite(loss_sum, members, "finetune population", epoch)
        val_loss, val_error = _classifier_valid(pop, x_valid, y_valid, eval_batch_size)
        keep = []
        for i, (m, tl, te, vl, ve) in enumerate(zip(
                members, (loss_sum / n).tolist(), (error_sum / n).tolist(),
                val_loss.tolist(), val_error.tolist())):
            histories[m].append({"epoch": epoch, "step": step, "train_loss": tl,
                                 "train_error": te, "val_loss": vl, "val_error": ve})
            # models.callbacks.TutorialEarlyStopping.on_train_epoch_end, per member
            if ve < best[m] * improvement_threshold:
                patience[m] = max(patience[m], int(step * patience_increase))
                stale[m] = 0
            else:
                stale[m] += 1
            if ve < best[m]:
                best[m], best_epoch[m] = ve, epoch
                best_state[m] = {k: v.cpu() for k, v in pop.member_state(i).items()}
            if (early_stopping == "tutorial" and step >= patience[m]) or (
                early_stopping == "patience" and stale[m] >= patience_epochs
            ):
                stopped[m] = True
                final_state[m] = best_state[m]
            else:
                keep.append(i)
        if not keep:
            members = []
            break
        if len(keep) < Pa:  # drop the stopped members from the batch
            keep_t = torch.tensor(keep, device=device)
            old = list(pop.parameters())
            pop.select(keep_t)
            opt = _slice_optimizer(old, list(pop.parameters()), opt, optimizer, keep_t)
            members = [members[i] for i in keep]
            seeds = [seeds[i] for i in keep]
            if dropout is not None:
                dropout = [dropout[i] for i in keep]
    for i, m in enumerate(members):  # ran out of epochs: the best weights, as on_train_end
        final_state[m] = best_state[m] or {k: v.cpu() for k, v in pop.member_state(i).items()}
    return PopulationResult(
        states=[s for s in final_state], histories=histories, best_val_error=best,
        best_epoch=best_epoch, stopped_early=stopped, seconds=time.perf_counter() - started,
    )


@torch.no_grad()
def _classifier_valid(pop: ClassifierPopulation, x: torch.Tensor, y: torch.Tensor,
                      chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation loss and error per member (P,), batch-weighted means over chunks of
    ``chunk`` examples: the arithmetic of Lightning's epoch-level ``self.log``, so that the
    error (which decides early stopping) is the single run's float, bit for bit."""
    was_training = pop.training
    pop.eval()
    width = max(w.shape[1] for w in pop.weights)
    loss_sum = torch.zeros(pop.P, dtype=x.dtype, device=x.device)
    error_sum = torch.zeros(pop.P, dtype=x.dtype, device=x.device)
    for start in range(0, len(x), chunk):
        b = min(chunk, len(x) - start)
        nll = torch.zeros_like(loss_sum)
        wrong = torch.zeros(pop.P, dtype=torch.long, device=x.device)
        for s, e in _sub_chunks(start, start + b, pop.P, width):
            logits = pop(x[s:e])  # shared input (rows, D) -> (P, rows, C)
            yb = y[s:e]
            nll += F.cross_entropy(logits.flatten(0, 1), yb.repeat(pop.P),
                                   reduction="none").view(pop.P, e - s).sum(dim=1)
            wrong += (logits.argmax(dim=2) != yb).sum(dim=1)
        error = wrong.to(x.dtype) / b  # = (argmax != y).float().mean(), exactly
        loss_sum, error_sum = loss_sum + nll / b * b, error_sum + error * b
    pop.train(was_training)
    return loss_sum / len(x), error_sum / len(x)
