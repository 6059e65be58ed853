"""Deterministic, resumable, rank-sharded batching for map-style datasets (GLUE training and evaluation).

Training: an infinite sequence of epochs; epoch e is a permutation of the dataset from a generator seeded by
(seed, e); rank r takes positions r, r+world, ... of it, cut to the same length on every rank, in full batches
only, so every rank runs the same number of steps. The position is a single integer (batches consumed), saved
in checkpoints: a resumed run starts exactly where the interrupted one stopped, not at the start of an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from arc_dist.errors import DataError


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, num_examples: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_batch: int = 0):
        self.per_rank = num_examples // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch < 1:
            raise DataError(
                f"{num_examples} training examples are too few for {world_size} ranks x batch {batch_size}: "
                "lower train.micro_batch_size or use more data"
            )
        self.num_examples, self.batch_size = num_examples, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start_batch = start_batch

    def epoch_indices(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_examples, generator=g)
        return order[self.rank :: self.world_size][: self.per_rank].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, offset = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            indices = self.epoch_indices(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield indices[b * self.batch_size : (b + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # an epoch; iteration itself is infinite
        return self.batches_per_epoch


def shard_for_eval(num_examples: int, rank: int, world_size: int) -> list[int]:
    """Rank r evaluates examples r, r+world, ...: disjoint, together the whole set, no padding duplicates."""
    return list(range(rank, num_examples, world_size))


def subset_indices(num_examples: int, size: int | None, seed: int) -> list[int]:
    """A seeded random subset (all examples, in order, when size is None or not smaller)."""
    if size is None or size >= num_examples:
        return list(range(num_examples))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_examples, generator=g)[:size].tolist())
