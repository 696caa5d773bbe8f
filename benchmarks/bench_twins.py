"""The pipeline's fine-tuning stage at the ``default`` preset's size: the pretrained and the
random twin as one population of two (what ``flows.pipeline`` runs) against the two arms
one after the other (two populations of one), the same work and the same results.

A 784-1000-1000-1000-10 sigmoid classifier, batch 20, SGD lr 0.1, one epoch of
``N_TRAIN`` examples plus validation on the benchmark's validation set; the "pretrained"
twin starts from other random weights (the speed does not depend on where the weights come
from). Both sides run ``repeats`` times, interleaved, and keep their fastest wall time.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import Data, device, float32_trainer, sync
from models.classifier import DeepClassifier
from training.classifier_training import train_classifier_population
from runtime.keys import Seed, derive_seed

SIZES = (784, 1000, 1000, 1000)
N_TRAIN = 2000
BATCH = 20
LR = 0.1


def _twins() -> list[DeepClassifier]:
    return [DeepClassifier.random_init(SIZES[0], list(SIZES[1:]), 10,
                                       generator=torch.Generator().manual_seed(seed))
            for seed in (derive_seed(0, Seed.PRETRAIN_INIT, 0), derive_seed(0, Seed.RANDOM_INIT))]


def run(data: Data, repeats: int = 2, log=print) -> dict[str, Any]:
    dev = device()
    x, y = data.x_train[:N_TRAIN].to(dev), data.y_train[:N_TRAIN].to(dev)
    xv, yv = data.x_valid.to(dev), data.y_valid.to(dev)
    order = derive_seed(0, Seed.FINETUNE_ORDER)

    def fit(members: list[DeepClassifier]) -> list[dict[str, torch.Tensor]]:
        return train_classifier_population(
            members, x, y, xv, yv, order_seeds=[order] * len(members), batch_size=BATCH,
            optimizer={"name": "sgd", "lr": LR}, trainer=float32_trainer(1)).states

    def timed(fn) -> tuple[float, list[dict[str, torch.Tensor]]]:
        sync(dev)
        started = time.perf_counter()
        states = fn()
        sync(dev)
        return time.perf_counter() - started, states

    def sequential() -> list[dict[str, torch.Tensor]]:
        return [state for twin in _twins() for state in fit([twin])]

    fit(_twins()[:1])  # warm-up
    together_s = apart_s = float("inf")
    for _ in range(repeats):
        wall, together = timed(lambda: fit(_twins()))
        together_s = min(together_s, wall)
        wall, apart = timed(sequential)
        apart_s = min(apart_s, wall)
    diff = max(float((a[k] - b[k]).abs().max()) for a, b in zip(together, apart) for k in a)
    row = {"sizes": list(SIZES), "batch_size": BATCH, "examples": N_TRAIN,
           "twins_population_s": round(together_s, 3), "two_arms_sequential_s": round(apart_s, 3),
           "speedup": round(apart_s / together_s, 3), "max_weight_diff": diff}
    log(f"  twins as one population {together_s:.2f} s, two arms in turn {apart_s:.2f} s: "
        f"{row['speedup']:.2f}x (same weights: max diff {diff:.1e})")
    return row
