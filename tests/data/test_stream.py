"""The streaming loader: determinism, exact resume, rank/worker splitting, shuffling and padding (real shards)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import launch, make_tokenizer, synthetic_text

from arc_dist.data.corpus import CorpusManifest, prepare_corpus, read_shard
from arc_dist.data.stream import ShardStream, build_stream_loader

SEQ_LEN = 32
SHARD_SIZE = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 250 sequences in 13 shards of 20 (the last one shorter) whose final sequence is padded."""
    root = tmp_path_factory.mktemp("stream")
    tokenizer = make_tokenizer(root / "tok")
    text = synthetic_text(root / "a.txt", n_lines=400, seed=0)
    manifest = prepare_corpus([str(text)], tokenizer, root / "c", seq_len=SEQ_LEN, samples_per_shard=SHARD_SIZE)
    assert manifest.num_tokens < manifest.num_samples * SEQ_LEN, "fixture must contain a padded sequence"
    assert manifest.shards[-1]["samples"] < SHARD_SIZE, "fixture must contain a short shard"
    return root / "c"


@pytest.fixture(scope="module")
def manifest(corpus) -> CorpusManifest:
    return CorpusManifest.load(corpus)


@pytest.fixture(scope="module")
def all_samples(corpus, manifest) -> dict[str, tuple[int, ...]]:
    samples = {}
    for shard in manifest.shards:
        samples.update((k, tuple(ids.tolist())) for k, ids in read_shard(corpus / shard["file"], SEQ_LEN))
    assert len(set(samples.values())) == len(samples), "samples must be distinct for content comparisons"
    return samples


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(iter(loader), n))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["attention_mask"], y["attention_mask"])
        for x, y in zip(a, b)
    )


def epoch_keys(stream: ShardStream, manifest: CorpusManifest, epoch: int, worker: int = 0, workers: int = 1):
    """The keys one worker reads in `epoch` (taken from its continuous sample stream)."""
    before = sum(
        manifest.shards[s]["samples"] for e in range(epoch) for s in stream.shards_for(e, worker, workers)
    )
    size = sum(manifest.shards[s]["samples"] for s in stream.shards_for(epoch, worker, workers))
    return [key for key, _ in itertools.islice(stream.samples(worker, workers), before, before + size)]


def test_batches_are_padded_with_attention_mask(corpus, manifest, all_samples):
    batches = take(build_stream_loader(corpus, 8, 0, 1, seed=0, num_workers=0), manifest.num_samples // 8 + 1)
    lengths = []
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == (8, SEQ_LEN) and ids.dtype == mask.dtype == torch.long
        for row_ids, row_mask in zip(ids, mask):
            n = int(row_mask.sum())
            lengths.append(n)
            assert row_mask[:n].all() and not row_mask[n:].any()
            assert row_ids[0] == manifest.cls_token_id and row_ids[n - 1] == manifest.sep_token_id
            assert (row_ids[n:] == manifest.pad_token_id).all()
            assert tuple(row_ids[:n].tolist()) in set(all_samples.values())
    assert min(lengths) < SEQ_LEN


def test_same_seed_same_batches_and_different_seed_differs(corpus):
    first = take(build_stream_loader(corpus, 8, 0, 1, seed=3, num_workers=1), 12)
    again = take(build_stream_loader(corpus, 8, 0, 1, seed=3, num_workers=1), 12)
    other = take(build_stream_loader(corpus, 8, 0, 1, seed=4, num_workers=1), 12)
    assert same_batches(first, again)
    assert not same_batches(first, other)


def test_shuffle_changes_order_within_and_across_epochs(corpus, manifest):
    stream = ShardStream(corpus, manifest, batch_size=8, rank=0, world_size=1, seed=0, shuffle_shards_per_group=4)
    epoch0, epoch1 = epoch_keys(stream, manifest, 0), epoch_keys(stream, manifest, 1)
    assert sorted(epoch0) == sorted(epoch1) and len(epoch0) == manifest.num_samples
    assert epoch0 != sorted(epoch0) and epoch0 != epoch1
    first_group = stream.shards_for(0)[:4]
    group_len = sum(manifest.shards[s]["samples"] for s in first_group)
    assert {int(key[:5]) for key in epoch0[:group_len]} == set(first_group), "the buffer is the first 4 shards"
    assert len({key[:5] for key in epoch0[:SHARD_SIZE]}) > 1, "a group's samples must be mixed across its shards"


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("group", [1, 3, 13])
def test_resume_continues_exactly(corpus, manifest, num_workers, group):
    """Resuming at batch k yields what the uninterrupted stream yields from k on, across group and epoch ends."""
    batch_size, tail = 7, 12
    epoch_batches = manifest.num_samples // batch_size
    ks = [1, 5, 17, epoch_batches, epoch_batches + 3, 2 * epoch_batches + 2]

    def loader(start: int):
        return build_stream_loader(corpus, batch_size, 0, 1, seed=11, num_workers=num_workers,
                                   start_batch=start, shuffle_shards_per_group=group)

    full = take(loader(0), max(ks) + tail)
    for k in ks:
        assert same_batches(take(loader(k), tail), full[k: k + tail]), f"resume at batch {k} diverged"


def test_resume_skips_whole_groups_without_reading_them(tmp_path, corpus, manifest):
    """Shards before the resume point may be unreadable: resume computes its position instead of replaying."""
    copy = Path(shutil.copytree(corpus, tmp_path / "c"))
    stream = ShardStream(copy, manifest, batch_size=5, rank=0, world_size=1, seed=2, shuffle_shards_per_group=2)
    full = list(itertools.islice(iter(stream), 30))
    order = stream.shards_for(0)
    start = 12  # 60 samples: groups of two 20-sample shards -> the first group (40 samples) is skipped
    assert manifest.shards[order[0]]["samples"] + manifest.shards[order[1]]["samples"] <= start * 5
    for s in order[:2]:
        (copy / manifest.shards[s]["file"]).write_bytes(b"garbage" * 100)
    resumed = ShardStream(copy, manifest, batch_size=5, rank=0, world_size=1, seed=2,
                          shuffle_shards_per_group=2, start_batch=start)
    assert same_batches(list(itertools.islice(iter(resumed), 10)), full[start: start + 10])


@pytest.mark.parametrize("workers", [1, 2])
def test_two_ranks_split_each_epoch_disjointly_and_completely(corpus, manifest, all_samples, workers):
    streams = [ShardStream(corpus, manifest, batch_size=4, rank=r, world_size=2, seed=5) for r in (0, 1)]
    for epoch in (0, 1):
        seen = [
            key for stream in streams for w in range(workers) for key in epoch_keys(stream, manifest, epoch, w, workers)
        ]
        assert len(seen) == len(set(seen)) == len(all_samples)
        assert set(seen) == set(all_samples)
    shards0, shards1 = (set(streams[r].shards_for(0)) for r in (0, 1))
    assert not shards0 & shards1 and len(shards0) - len(shards1) in (0, 1)


def test_rank_with_fewer_samples_keeps_yielding(corpus, manifest):
    """Ranks own different amounts of data; each stream is infinite so no rank runs dry before the others."""
    stream = ShardStream(corpus, manifest, batch_size=16, rank=1, world_size=2, seed=0)
    batches = list(itertools.islice(iter(stream), 3 * manifest.num_samples // 16))
    assert len(batches) == 3 * manifest.num_samples // 16
    assert all(b["input_ids"].shape == (16, SEQ_LEN) for b in batches)


@pytest.mark.slow
def test_two_ranks_under_torchrun_see_disjoint_samples(tmp_path, corpus, all_samples):
    out = tmp_path / "out"
    out.mkdir()
    batches, batch_size = 10, 4
    launch(Path(__file__).with_name("stream_ranks.py"),
           [str(corpus), str(out), "--batches", str(batches), "--batch-size", str(batch_size), "--workers", "2"],
           nprocs=2, launcher="torchrun", timeout=300)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1] and all(r["world_size"] == 2 for r in results)
    assert [len(r["batches"]) for r in results] == [batches, batches]
    assert all(r["total_batches"] == 2 * batches for r in results)
    seen = [{tuple(ids) for batch in r["batches"] for ids in batch} for r in results]
    assert [len(s) for s in seen] == [batches * batch_size] * 2, "a rank repeated a sample within its first epoch"
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] <= set(all_samples.values())
