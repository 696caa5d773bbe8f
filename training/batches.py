"""The data order of training: a seeded permutation per epoch, sliced into minibatches of
indices into tensors that already live on the training device.

No per-sample ``Dataset``, no collate, no worker processes: an epoch is one seeded
permutation per member, and a batch is one gather. The permutation is drawn on the CPU
from ``(seed, epoch)`` alone, so twins that share a seed see the same data order on any
device.

Training batches come in *chunks*: one item of the loader is a list of consecutive
minibatches, and the engine takes one optimiser step per minibatch. Lightning's per-batch
machinery (hooks, progress, fetching) then runs once per chunk instead of once per step:
at small batch sizes it cost as much as the arithmetic (≈ 1 ms a step on a CPU). The
steps, their order and their results are exactly those of one minibatch per item.
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol, Sequence

import torch


class OrderedMembers(Protocol):
    """What the chunks read of the system they feed (``training.engine.PopulationSystem``):
    the data-order seeds of the members still training, and the training device."""

    order_seeds: Sequence[int]
    device: torch.device

#: Examples per training chunk (one Lightning batch): enough that a chunk's arithmetic
#: outweighs Lightning's per-batch cost at any batch size.
CHUNK_EXAMPLES = 1024


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a permutation of range(n) fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(n, generator=g)


class EpochChunks:
    """One epoch of per-member minibatch indices, in chunks: each item is a list of (P, b)
    index tensors, one per optimiser step. Member p's epoch e is
    ``epoch_permutation(n, order_seeds[p], e)`` cut into batches of ``batch_size`` (the last
    one may be short). The seeds are read from the system at every epoch, so members that
    stopped early are left out. An epoch resumed inside (``skip``) yields its chunks done
    before as empty lists, so the rest keep their places.

    Args:
        system: The system whose ``order_seeds`` and device are used.
        n: Training examples.
        batch_size: Minibatch size.
    """

    def __init__(self, system: OrderedMembers, n: int, batch_size: int):
        self.system, self.n, self.batch_size = system, n, batch_size
        self.steps_per_epoch = math.ceil(n / batch_size)
        self.steps_per_chunk = max(1, CHUNK_EXAMPLES // batch_size)
        self.epoch = 0
        self.skip = 0  # chunks of the next epoch already done (a resume inside an epoch)

    def __len__(self) -> int:
        return math.ceil(self.steps_per_epoch / self.steps_per_chunk)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        seeds = self.system.order_seeds
        order = torch.stack([epoch_permutation(self.n, s, self.epoch) for s in seeds])
        order = order.to(self.system.device)  # (P, n)
        self.epoch += 1
        batches = [order[:, s : s + self.batch_size] for s in range(0, self.n, self.batch_size)]
        skip, self.skip = self.skip, 0
        for i, start in enumerate(range(0, len(batches), self.steps_per_chunk)):
            yield [] if i < skip else batches[start : start + self.steps_per_chunk]
