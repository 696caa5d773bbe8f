"""An estimate of a run's peak memory, made before anything is loaded or trained.

All tensors are float32 (4 bytes). With ``D`` input features, hidden widths ``h_1..h_L``,
``C`` classes, ``N`` rows loaded (training pool + test), ``B`` the largest batch and ``P``
members trained at once (the pipeline's twins: 2; an ablation's population: P)::

    params   = sum_k (w_{k-1} w_k + w_k) + h_L C + C          (the classifier, w_0 = D)
    dae_k    = w_{k-1} w_k + w_{k-1} + w_k (+ w_{k-1} w_k untied)
    training = 4 (weights + gradients + optimizer slots) * params   (slots: SGD 0,
                                                        momentum 1, Adam 2)
    acts     = 4 * 3 * B * sum_k w_k                       (pre-activation, output, gradient)
    data     = 4 * 2 * N * D                               (normalised splits + one copy
                                                        while normalising)
    codes    = 4 * N * max_k h_k                           (clean codes of a layer's input)
    peak     = BASE + data + codes + P * (training + acts) + eval

``BASE`` is the measured resident size of a process that has imported torch, Lightning,
MLflow and Prefect. On a GPU the device part (everything but ``BASE``) is compared with
the device's free memory, and the whole with this machine's available memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

FLOAT = 4
#: Resident size of a process after importing torch, Lightning, MLflow (with
#: ``mlflow.pytorch``) and Prefect: 1,126 MiB measured on Linux x86_64 with torch's CPU build.
BASE_BYTES = 1126 * 2**20
OPTIMIZER_SLOTS = {"adam": 2, "sgd": 0}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know about the data: rows loaded, features, classes."""

    n_rows: int
    n_features: int
    n_classes: int


def _optimizer_slots(optimizer) -> int:
    if optimizer.name == "sgd":
        return 1 if optimizer.momentum > 0 else 0
    return OPTIMIZER_SLOTS[optimizer.name]


def classifier_params(n_features: int, hidden: list[int], n_classes: int) -> int:
    """Weights and biases of the deep classifier: hidden layers, then the softmax layer."""
    widths = [n_features, *hidden]
    return sum(a * b + b for a, b in zip(widths, widths[1:])) + hidden[-1] * n_classes + n_classes


def dae_params(n_in: int, n_hidden: int, tied: bool) -> int:
    """Weights and biases of one denoising autoencoder layer (tied: W' = W^T)."""
    return n_in * n_hidden + n_in + n_hidden + (0 if tied else n_in * n_hidden)


def peak_bytes(config, shape: Shape, population: int = 2,
               hidden: Optional[list[int]] = None) -> dict[str, int]:
    """The estimate's terms and their sum (``total``) and device part (``device``).

    Args:
        config: A ``PipelineConfig``.
        shape: The data's rows, features and classes.
        population: Members trained at once (2: the pipeline's twins).
        hidden: Hidden widths to estimate instead of ``config.model.hidden_sizes``.
    """
    hidden = list(hidden or config.model.hidden_sizes)
    widths = [shape.n_features, *hidden]
    batch = max(config.pretrain.batch_size, config.finetune.batch_size)
    finetune = FLOAT * classifier_params(shape.n_features, hidden, shape.n_classes) * (
        2 + _optimizer_slots(config.finetune.optimizer))
    pretrain = max(FLOAT * dae_params(a, b, config.model.tied_weights)
                   * (2 + _optimizer_slots(config.pretrain.optimizer))
                   for a, b in zip(widths, widths[1:]))
    terms = {
        "data": FLOAT * 2 * shape.n_rows * shape.n_features,
        "codes": FLOAT * shape.n_rows * max(hidden),
        "training": population * max(finetune, pretrain),
        "activations": population * FLOAT * 3 * batch * sum(widths),
        "evaluation": FLOAT * 2 * config.runtime.eval_batch_size * max(widths),
    }
    device = sum(terms.values())
    return {**terms, "base": BASE_BYTES, "device": device, "total": device + BASE_BYTES}


def available_bytes() -> int:
    """Memory this process may still use: ``MemAvailable``, or the cgroup's limit minus its
    use when that is lower (a container)."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def largest_width_that_fits(config, shape: Shape, population: int, budget: int,
                            key: str) -> Optional[int]:
    """The largest cap W on every hidden width whose estimate (``key``: total or device)
    stays within ``budget``; None when not even width 1 fits."""
    hidden = config.model.hidden_sizes

    def fits(width: int) -> bool:
        capped = [min(h, width) for h in hidden]
        return peak_bytes(config, shape, population, capped)[key] <= budget

    if not fits(1):
        return None
    lo, hi = 1, max(hidden)  # fits(lo) holds, fits(hi) does not (else nothing was refused)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memory_problem(config, shape: Shape, population: int, budget: int, where: str,
                   key: str = "total") -> Optional[str]:
    """A sentence when the estimate exceeds ``budget``: the estimate, its largest terms and
    the largest ``model.hidden_sizes`` that fits.

    Args:
        config: A ``PipelineConfig``.
        shape: The data's rows, features and classes.
        population: Members trained at once.
        budget: Bytes available (``where`` says which memory).
        where: E.g. "this machine's available memory".
        key: "total" (host) or "device" (a GPU's share).
    """
    estimate = peak_bytes(config, shape, population)
    if estimate[key] <= budget:
        return None
    gib = 2**30
    terms = ", ".join(f"{k} {v / gib:.2f}" for k, v in estimate.items()
                      if k not in ("device", "total") and (key == "total" or k != "base"))
    width = largest_width_that_fits(config, shape, population, budget, key)
    if width is None:
        fix = ("even width-1 layers do not fit: lower data.n_train or runtime.eval_batch_size, "
               "or run on a machine with more memory")
    else:
        capped = ",".join(str(min(h, width)) for h in config.model.hidden_sizes)
        fix = f"the largest that fits is --set model.hidden_sizes=[{capped}]"
    asked = ",".join(map(str, config.model.hidden_sizes))
    return (f"model.hidden_sizes=[{asked}] needs about {estimate[key] / gib:.2f} GiB at its peak ({terms} GiB; "
            f"population {population}), more than {where} ({budget / gib:.2f} GiB): {fix}")
