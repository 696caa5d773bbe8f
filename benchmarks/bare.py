"""The reference floor: minimal hand-written PyTorch loops of the project's math.

Each does what the project's engine does for one stage at P = 1 and nothing else: the same
initial weights, masking noise from one generator on the training device (one draw per
step), the data order of ``training.batches.epoch_permutation`` sliced by ``index_select``,
``torch.optim.SGD``, the per-epoch means of the history, and the best-weights bookkeeping
of early stopping. It ends with the same weights as the project's run
(checked by the benchmark), so the time between the two is pure orchestration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from benchmarks.common import sync
from training.batches import epoch_permutation


@dataclass
class Run:
    loop_s: float  # training steps only
    loop_cpu_s: float  # the same steps in process CPU time (all threads)
    total_s: float  # the whole stage: setup, steps, validation, bookkeeping
    state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)


def _leaves(state: dict[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().to(dev).requires_grad_() for k, v in state.items()}


def dae(init: dict[str, torch.Tensor], x: torch.Tensor, x_valid: torch.Tensor, *,
        level: float, lr: float, batch_size: int, noise_seed: int, order_seed: int,
        epochs: int = 1, eval_batch_size: int = 4096) -> Run:
    """A tied-weight, masking-noise, cross-entropy dA (``DenoisingAutoencoder`` defaults)."""
    started = time.perf_counter()
    dev = x.device
    p = _leaves(init, dev)
    W, b, b_prime = p["encoder.linear.weight"], p["encoder.linear.bias"], p["b_prime"]
    opt = torch.optim.SGD([W, b, b_prime], lr=lr)
    g = torch.Generator(device=dev).manual_seed(noise_seed)
    n, loop_s, loop_cpu, history = len(x), 0.0, 0.0, []
    for epoch in range(epochs):
        order = epoch_permutation(n, order_seed, epoch).to(dev)
        total = torch.zeros((), device=dev)
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, n, batch_size):
            xb = x.index_select(0, order[start : start + batch_size])  # (B, 784) clean
            keep = torch.rand(xb.shape, generator=g, device=dev, dtype=xb.dtype) >= level
            h = torch.sigmoid(F.linear(xb * keep, W, b))  # (B, 784) -> (B, H)
            a = F.linear(h, W.t(), b_prime)  # (B, H) -> (B, 784) logits
            loss = F.binary_cross_entropy_with_logits(a, xb, reduction="none").sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total = total + loss.detach() * len(xb)
        sync(dev)
        loop_s += time.perf_counter() - t0
        loop_cpu += time.process_time() - c0
        with torch.no_grad():
            val = sum(float(F.binary_cross_entropy_with_logits(
                F.linear(torch.sigmoid(F.linear(v, W, b)), W.t(), b_prime), v,
                reduction="none").sum(1).sum()) for v in x_valid.split(eval_batch_size))
        recon = float(total) / n
        if not math.isfinite(recon):
            raise FloatingPointError("bare dA diverged")
        history.append({"epoch": epoch, "recon_loss": recon, "val_recon_loss": val / len(x_valid)})
    state = {k: v.detach().cpu() for k, v in p.items()}
    return Run(loop_s, loop_cpu, time.perf_counter() - started, state, history)


def classifier(init: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               x_valid: torch.Tensor, y_valid: torch.Tensor, *, lr: float, batch_size: int,
               order_seed: int, epochs: int = 1, eval_batch_size: int = 4096) -> Run:
    """A sigmoid ``DeepClassifier`` (no dropout) with softmax cross-entropy."""
    started = time.perf_counter()
    dev = x.device
    p = _leaves(init, dev)
    n_hidden = sum(1 for k in p if k.endswith(".linear.weight"))
    layers = [(p[f"hidden.{i}.linear.weight"], p[f"hidden.{i}.linear.bias"])
              for i in range(n_hidden)] + [(p["output.weight"], p["output.bias"])]
    opt = torch.optim.SGD(list(p.values()), lr=lr)

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        for W, b in layers[:-1]:
            h = torch.sigmoid(F.linear(h, W, b))  # (B, n_in) -> (B, n_out)
        return F.linear(h, *layers[-1])  # (B, 10)

    n, loop_s, loop_cpu, history = len(x), 0.0, 0.0, []
    best, best_state = math.inf, None
    for epoch in range(epochs):
        order = epoch_permutation(n, order_seed, epoch).to(dev)
        loss_sum = torch.zeros((), device=dev)
        error_sum = torch.zeros((), device=dev)
        sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            logits = logits_of(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                loss_sum = loss_sum + loss * len(yb)
                error_sum = error_sum + (logits.argmax(1) != yb).float().mean() * len(yb)
        sync(dev)
        loop_s += time.perf_counter() - t0
        loop_cpu += time.process_time() - c0
        with torch.no_grad():
            wrong = sum(int((logits_of(v).argmax(1) != t).sum())
                        for v, t in zip(x_valid.split(eval_batch_size),
                                        y_valid.split(eval_batch_size)))
        val_error = wrong / len(x_valid)
        if val_error < best:
            best, best_state = val_error, {k: v.detach().clone() for k, v in p.items()}
        history.append({"epoch": epoch, "train_loss": float(loss_sum) / n,
                        "train_error": float(error_sum) / n, "val_error": val_error})
    state = {k: v.detach().cpu() for k, v in (best_state or p).items()}  # the best weights
    return Run(loop_s, loop_cpu, time.perf_counter() - started, state, history)
