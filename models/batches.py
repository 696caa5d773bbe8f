"""Minibatches as slices of tensors that already live on the training device.

No per-sample ``Dataset``, no collate, no worker processes: an epoch is one seeded
permutation, and a batch is one ``index_select``. The permutation is drawn on the CPU from
``(seed, epoch)`` alone, so twins that share a seed see the same data order on any device.
"""

from __future__ import annotations

from typing import Iterator, Optional

import lightning as L
import torch


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation of range(n) fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=g)


class DeviceBatches:
    """An iterable of minibatch tuples sliced from same-length tensors on one device.

    Args:
        tensors: Tensors sharing their first dimension, e.g. (x,) or (x, y).
        batch_size: Examples per batch; the last batch of an epoch may be smaller.
        shuffle: Draw a fresh seeded permutation at every ``iter()`` (one per epoch).
        seed: Seed of the data order.
    """

    def __init__(
        self, tensors: tuple[torch.Tensor, ...], batch_size: int, shuffle: bool, seed: int = 0
    ):
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise ValueError("all tensors of a DeviceBatches need the same first dimension")
        self.tensors, self.batch_size, self.shuffle, self.seed = tensors, batch_size, shuffle, seed
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        device = self.tensors[0].device
        if self.shuffle:
            order = epoch_permutation(self.n, self.seed, self.epoch).to(device)
            self.epoch += 1
            for start in range(0, self.n, self.batch_size):
                idx = order[start : start + self.batch_size]
                yield tuple(t.index_select(0, idx) for t in self.tensors)
        else:
            for start in range(0, self.n, self.batch_size):
                yield tuple(t[start : start + self.batch_size] for t in self.tensors)


class TensorDataModule(L.LightningDataModule):
    """Train/validation tensors moved once to the trainer's device, served as slices.

    Args:
        train: Training tensors, e.g. (x,) for an autoencoder or (x, y) for a classifier.
        val: Validation tensors of the same arity, or None.
        batch_size: Training batch size.
        seed: Seed of the training data order.
        eval_batch_size: Batch size of validation (large: it only costs memory).
    """

    def __init__(
        self,
        train: tuple[torch.Tensor, ...],
        val: Optional[tuple[torch.Tensor, ...]],
        batch_size: int,
        seed: int,
        eval_batch_size: int = 4096,
    ):
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.seed, self.eval_batch_size = batch_size, seed, eval_batch_size

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer else torch.device("cpu")

    def train_dataloader(self) -> DeviceBatches:
        tensors = tuple(t.to(self._device()) for t in self.train)
        return DeviceBatches(tensors, self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> DeviceBatches | list:
        if self.val is None:
            return []
        tensors = tuple(t.to(self._device()) for t in self.val)
        return DeviceBatches(tensors, self.eval_batch_size, shuffle=False)
