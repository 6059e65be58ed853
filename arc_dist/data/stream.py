"""Stage-1 streaming loader: infinite, deterministic, exactly resumable batches from a prepared corpus.

Everything about the order of samples is a pure function of (seed, epoch, rank, worker, group index) and the
manifest's per-shard sample counts. That is what makes resume exact and cheap: the position after N consumed
batches is computed, not replayed, and only the one shard group containing the resume point is ever opened.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import signal
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from arc_dist.data.corpus import CorpusManifest, read_shard, validate_corpus
from arc_dist.errors import ConfigError


def _stable_seed(*parts: object) -> int:
    """A seed from `parts` that is the same in every process and every run (Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode("utf-8")).digest()[:8], "big")


class ShardStream(IterableDataset):
    """Infinite stream of padded batches for one rank; each DataLoader worker reads its own disjoint shards.

    Order, for every epoch e = 0, 1, 2, ...:
      1. all shards are permuted with an RNG seeded from (seed, e);
      2. rank r takes positions r, r + world_size, ... of that permutation (explicit node split: ranks never share
         a shard within an epoch);
      3. worker w of W takes every W-th shard of the rank's list (num_workers=0 is one in-process worker);
      4. the worker's list is cut into groups of `shuffle_shards_per_group` consecutive shards; each group is read
         into memory and its samples shuffled with an RNG seeded from (seed, e, rank, w, group index) — a block
         shuffle whose buffer is bounded by the group size.
    Batches of `batch_size` samples are cut from the worker's sample stream and may span groups and epochs.

    The stream never ends: a rank that runs out of shards starts its next epoch, so every rank yields a batch at
    every step and a collective in the trainer can never hang on a rank whose data ran out; the trainer alone
    decides how many steps to take. Ranks may be in different epochs when shard sizes differ, which is harmless.

    Resume: the DataLoader takes batches from its workers round-robin, in order, so batch i of the rank's stream
    comes from worker i % W, and after N batches worker w has produced N // W + (w < N % W) of them. A fresh
    DataLoader always asks its worker 0 first, so with `start_batch=N` DataLoader worker j plays stream worker
    (j + N) % W (its shards and seeds); each then skips its share of samples by walking the manifest's sample
    counts (whole groups are skipped without being opened), loads the group containing the resume point,
    reshuffles it with the same seed and continues from inside it. The
    resumed stream is identical to the uninterrupted one from batch N on, given the same corpus, seed, batch_size,
    world_size, num_workers and shuffle_shards_per_group.
    """

    def __init__(
        self,
        corpus_dir: str | Path,
        manifest: CorpusManifest,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_shards_per_group: int = 4,
        start_batch: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 (got {batch_size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size (got rank {rank}, world_size {world_size})")
        if shuffle_shards_per_group < 1:
            raise ConfigError(f"shuffle_shards_per_group must be >= 1 (got {shuffle_shards_per_group})")
        if start_batch < 0:
            raise ConfigError(f"start_batch must be >= 0 (got {start_batch})")
        self.corpus_dir = Path(corpus_dir)
        self.manifest = manifest
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_shards_per_group = shuffle_shards_per_group
        self.start_batch = start_batch

    def shards_for(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Indices into `manifest.shards` that (this rank, `worker` of `num_workers`) reads in `epoch`, in order."""
        order = list(range(len(self.manifest.shards)))
        random.Random(_stable_seed("shard-order", self.seed, epoch)).shuffle(order)
        return order[self.rank::self.world_size][worker::num_workers]

    def samples(self, worker: int = 0, num_workers: int = 1, skip: int = 0) -> Iterator[tuple[str, np.ndarray]]:
        """The infinite (key, ids) sample stream of one worker, starting after its first `skip` samples."""
        if not self.shards_for(0, worker, num_workers):
            raise ConfigError(
                f"corpus {self.corpus_dir} has {len(self.manifest.shards)} shards, too few for {self.world_size} "
                f"ranks x {num_workers} data workers; re-run `arc prepare-corpus` with --min-shards "
                f"{self.world_size * num_workers} or lower data.num_workers"
            )
        counts = [shard["samples"] for shard in self.manifest.shards]
        group_size = self.shuffle_shards_per_group
        for epoch in itertools.count():
            shards = self.shards_for(epoch, worker, num_workers)
            for index in range(0, (len(shards) + group_size - 1) // group_size):
                group = shards[index * group_size:(index + 1) * group_size]
                size = sum(counts[s] for s in group)
                if skip >= size:
                    skip -= size
                    continue
                loaded = self._load_group(group, epoch, worker, index)
                yield from itertools.islice(loaded, skip, None)
                skip = 0

    def _load_group(self, group: list[int], epoch: int, worker: int, index: int) -> list[tuple[str, np.ndarray]]:
        samples: list[tuple[str, np.ndarray]] = []
        for shard_index in group:
            shard = self.manifest.shards[shard_index]
            samples.extend(
                read_shard(self.corpus_dir / shard["file"], self.manifest.seq_len, expected_samples=shard["samples"])
            )
        random.Random(_stable_seed("group", self.seed, epoch, self.rank, worker, index)).shuffle(samples)
        return samples

    def _collate(self, batch: list[np.ndarray]) -> dict[str, torch.Tensor]:
        seq_len = self.manifest.seq_len
        input_ids = np.full((len(batch), seq_len), self.manifest.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch), seq_len), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        loader_worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        worker = (loader_worker + self.start_batch) % num_workers
        consumed = self.start_batch // num_workers + (1 if worker < self.start_batch % num_workers else 0)
        samples = self.samples(worker, num_workers, skip=consumed * self.batch_size)
        while True:
            yield self._collate([ids for _, ids in itertools.islice(samples, self.batch_size)])


def build_stream_loader(
    corpus_dir: str | Path,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    num_workers: int = 1,
    start_batch: int = 0,
    shuffle_shards_per_group: int = 4,
    tokenizer: object = None,
    seq_len: int | None = None,
) -> DataLoader:
    """The stage-1 DataLoader for one rank, after checking the corpus fits this run (see `validate_corpus`).

    `start_batch` is the number of batches this rank already consumed (micro-batches, not optimizer steps). The
    DataLoader's default in-order delivery is relied on: it is what makes worker w's share of N batches known.
    """
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0 (got {num_workers})")
    manifest = validate_corpus(
        corpus_dir, tokenizer=tokenizer, seq_len=seq_len, world_size=world_size, num_workers=num_workers
    )
    dataset = ShardStream(
        corpus_dir,
        manifest,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_shards_per_group=shuffle_shards_per_group,
        start_batch=start_batch,
    )
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),  # the trainer copies batches to the GPU with non_blocking=True
        prefetch_factor=2 if num_workers > 0 else None,
        # Starting an iterator draws a base seed; from a private generator, so that it never consumes the global
        # RNG (which drives dropout) and a resumed run's dropout stream equals an uninterrupted one's.
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_ignore_stop_signals,
    )


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM/SIGUSR1: launchers (torchrun) and Slurm signal the whole process group, and
    a worker dying on it would crash its rank before the rank's own handler could finish the step and write the
    stop checkpoint. The workers end with their rank."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
