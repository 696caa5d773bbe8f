"""Minibatches as slices of tensors that already live on the training device.

No per-sample ``Dataset``, no collate, no worker processes: an epoch is one seeded
permutation, and a batch is one ``index_select``. The permutation is drawn on the CPU from
``(seed, epoch)`` alone, so twins that share a seed see the same data order on any device.

Training batches come in *chunks*: one item of the training loader is a list of up to
``steps_per_batch`` consecutive minibatches, and the training modules take one optimiser
step per minibatch (``models.pretrain_module``, ``models.finetune_module``). Lightning's
per-batch machinery (hooks, progress, fetching) then runs once per chunk instead of once
per step: at small batch sizes it cost as much as the arithmetic (≈ 1 ms a step on a CPU,
``make bench``). The steps, their order and their results are exactly those of one
minibatch per item.
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


def default_steps_per_batch(batch_size: int, examples: int = 1024) -> int:
    """Minibatches per training chunk: about ``examples`` examples per chunk, so that a
    chunk's arithmetic outweighs Lightning's per-batch cost at any batch size."""
    return max(1, examples // batch_size)


class ChunkedBatches:
    """Training minibatches of ``batches`` grouped ``steps_per_batch`` at a time: each item
    is a list of minibatch tuples, in the order ``batches`` yields them."""

    def __init__(self, batches: DeviceBatches, steps_per_batch: int):
        if steps_per_batch < 1:
            raise ValueError(f"steps_per_batch must be at least 1, got {steps_per_batch}")
        self.batches, self.steps_per_batch = batches, steps_per_batch

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def __len__(self) -> int:
        return (len(self.batches) + self.steps_per_batch - 1) // self.steps_per_batch

    def __iter__(self) -> Iterator[list[tuple[torch.Tensor, ...]]]:
        chunk: list[tuple[torch.Tensor, ...]] = []
        for batch in self.batches:
            chunk.append(batch)
            if len(chunk) == self.steps_per_batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


class TensorDataModule(L.LightningDataModule):
    """Train/validation tensors moved once to the trainer's device, served as slices.

    Args:
        train: Training tensors, e.g. (x,) for an autoencoder or (x, y) for a classifier.
        val: Validation tensors of the same arity, or None.
        batch_size: Training batch size.
        seed: Seed of the training data order.
        eval_batch_size: Batch size of validation (large: it only costs memory).
        steps_per_batch: Minibatches per training chunk (None: ``default_steps_per_batch``).
    """

    def __init__(
        self,
        train: tuple[torch.Tensor, ...],
        val: Optional[tuple[torch.Tensor, ...]],
        batch_size: int,
        seed: int,
        eval_batch_size: int = 4096,
        steps_per_batch: Optional[int] = None,
    ):
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.seed, self.eval_batch_size = batch_size, seed, eval_batch_size
        self.steps_per_batch = steps_per_batch or default_steps_per_batch(batch_size)

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer else torch.device("cpu")

    def train_dataloader(self) -> ChunkedBatches:
        tensors = tuple(t.to(self._device()) for t in self.train)
        return ChunkedBatches(DeviceBatches(tensors, self.batch_size, shuffle=True,
                                            seed=self.seed), self.steps_per_batch)

    def val_dataloader(self) -> DeviceBatches | list:
        if self.val is None:
            return []
        tensors = tuple(t.to(self._device()) for t in self.val)
        return DeviceBatches(tensors, self.eval_batch_size, shuffle=False)
