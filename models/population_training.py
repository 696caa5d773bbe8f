"""Training loops for populations (``models.population``): P seeds pretrained or fine-tuned
as one batched model, with the single run's data order, noise, dropout, per-epoch history
and per-member early stopping. See ``models.population`` for what "member p equals its
single run" means and for the seeds the pipeline uses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch
from torch.nn import functional as F

from models.batches import epoch_permutation
from models.classifier import DeepClassifier
from models.dae import DenoisingAutoencoder
from models.optim import build_optimizer
from models.classifier_population import ClassifierPopulation
from models.population import DAEPopulation, History, _gather, plain_sgd


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


def _use_fused(fused: Optional[bool], optimizer: Mapping[str, Any]) -> bool:
    """The fused steps hand-code plain SGD; None picks them whenever that is the optimiser."""
    if fused is None:
        return plain_sgd(optimizer)
    if fused and not plain_sgd(optimizer):
        raise ValueError("fused=True needs plain SGD (no momentum, no weight decay)")
    return fused


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
    fused = _use_fused(fused, optimizer)
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
    fused: Optional[bool] = None,
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
        fused: Use ``ClassifierPopulation.sgd_step`` (plain SGD only) instead of autograd
            and ``torch.optim``; None: whenever the optimiser is plain SGD.
    """
    if early_stopping not in ("tutorial", "patience", "none"):
        raise ValueError(f"unknown early-stopping rule {early_stopping!r}")
    fused = _use_fused(fused, optimizer)
    P = len(classifiers)
    _check_seeds(P, order_seeds=order_seeds, dropout_seeds=dropout_seeds)
    device = x_train.device
    pop = ClassifierPopulation(classifiers).to(device).train()
    if pop.dropout > 0 and dropout_seeds is None:
        raise ValueError("the classifiers use dropout: give dropout_seeds")
    opt = None if fused else build_optimizer(pop.parameters(), optimizer)
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
            if opt is None:
                loss, logits = pop.sgd_step(x, y, optimizer["lr"], dropout)  # (Pa,), (Pa, b, C)
            else:
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
            if opt is not None:
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
