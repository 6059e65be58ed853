"""Resumable rank-sharded batching for GLUE training, and the evaluation split."""

from itertools import islice

import pytest

from arc_dist.data.sampling import ResumableBatchSampler, shard_for_eval, subset_indices
from arc_dist.errors import DataError


def take(sampler, n):
    return list(islice(iter(sampler), n))


def test_ranks_disjoint_equal_and_cover_an_epoch():
    a = ResumableBatchSampler(101, 5, rank=0, world_size=2, seed=3)
    b = ResumableBatchSampler(101, 5, rank=1, world_size=2, seed=3)
    assert len(a) == len(b) == 10  # 50 per rank -> 10 full batches, the same on both ranks
    ea = [i for batch in take(a, 10) for i in batch]
    eb = [i for batch in take(b, 10) for i in batch]
    assert not set(ea) & set(eb) and len(set(ea) | set(eb)) == 100


@pytest.mark.parametrize("start", [0, 1, 7, 10, 23])
def test_resume_continues_exactly(start):
    full = take(ResumableBatchSampler(64, 4, 1, 2, seed=5), 40)
    resumed = take(ResumableBatchSampler(64, 4, 1, 2, seed=5, start_batch=start), 40 - start)
    assert resumed == full[start:]


def test_epochs_reshuffle_and_seeds_differ():
    batches = take(ResumableBatchSampler(32, 4, 0, 1, seed=1), 16)
    assert batches[:8] != batches[8:] and sorted(sum(batches[:8], [])) == list(range(32))
    assert take(ResumableBatchSampler(32, 4, 0, 1, seed=2), 8) != batches[:8]


def test_too_little_data_is_a_clear_error():
    with pytest.raises(DataError, match="too few for 4 ranks x batch 8"):
        ResumableBatchSampler(20, 8, 0, 4, seed=0)


def test_eval_shards_and_subset():
    shards = [shard_for_eval(11, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    sub = subset_indices(100, 10, seed=4)
    assert len(sub) == 10 == len(set(sub)) and sub == subset_indices(100, 10, seed=4)
    assert subset_indices(5, None, 0) == subset_indices(5, 50, 0) == list(range(5))
