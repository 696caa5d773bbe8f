"""Validation of every member of a population at once, with the arithmetic of a single
run's epoch-level means (a batch-size-weighted mean over chunks of the validation set)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from training.classifier_population import ClassifierPopulation
from training.population import DAEPopulation

#: Validation runs P members on a chunk at once; sub-chunks keep (P, rows, width) under this.
EVAL_ELEMENTS = 1 << 24


def _sub_chunks(start: int, stop: int, P: int, width: int):
    rows = max(1, EVAL_ELEMENTS // (P * width))
    for s in range(start, stop, rows):
        yield s, min(s + rows, stop)


@torch.no_grad()
def dae_valid_loss(pop: DAEPopulation, x_valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """Clean reconstruction loss per member (P,), the batch-weighted mean over chunks of
    ``chunk`` examples."""
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


@torch.no_grad()
def classifier_valid(pop: ClassifierPopulation, x: torch.Tensor, y: torch.Tensor,
                     chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation loss and error per member (P,), batch-weighted means over chunks of
    ``chunk`` examples; the error (which decides early stopping) is the fraction of wrong
    predictions, exactly."""
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
