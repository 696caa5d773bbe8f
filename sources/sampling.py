"""The one stratified sampler of the data stage: training subsets, validation and test
fractions of a user's file."""

from __future__ import annotations

import numpy as np

from runtime.errors import DataError


def stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Seeded, class-stratified subset of exactly ``n`` indices into ``y``, sorted.

    Class c gets n * count_c / N examples, rounded by largest remainder so the total is n;
    when n >= the number of classes present, each present class gets at least one.
    """
    y = np.asarray(y)
    if not 1 <= n <= len(y):
        raise DataError(f"data.n_train={n} is outside [1, {len(y)}] training examples")
    counts = np.bincount(y)  # (C,)
    quota = n * counts / len(y)
    alloc = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - alloc), kind="stable")  # largest remainder first
    alloc[order[: n - alloc.sum()]] += 1
    if n >= np.count_nonzero(counts):
        for c in np.flatnonzero((counts > 0) & (alloc == 0)):
            alloc[np.argmax(alloc)] -= 1  # one from the largest class, which has >= 2
            alloc[c] = 1
    rng = np.random.Generator(np.random.PCG64(seed))
    picks = [rng.choice(np.flatnonzero(y == c), k, replace=False) for c, k in enumerate(alloc)]
    return np.sort(np.concatenate(picks))
