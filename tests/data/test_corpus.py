"""Corpus preparation: packing, shard format, manifest, validation, corrupt-shard errors (real tokenizer and tars)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import WORDS, make_tokenizer, synthetic_text

from arc_dist.data.corpus import (
    CorpusManifest,
    prepare_corpus,
    read_shard,
    tokenizer_fingerprint,
    validate_corpus,
)
from arc_dist.data.stream import build_stream_loader
from arc_dist.errors import ConfigError, DataError

SEQ_LEN = 32


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Synthetic text with blank and whitespace-only lines mixed in (they must be skipped)."""
    path = tmp_path_factory.mktemp("text") / "a.txt"
    synthetic_text(path, n_lines=300, seed=1)
    lines = path.read_text().splitlines()
    for i in range(0, len(lines), 37):
        lines.insert(i, "   " if i % 2 else "")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer, text_file) -> Path:
    out = tmp_path_factory.mktemp("corpora") / "c"
    prepare_corpus([str(text_file)], tokenizer, out, seq_len=SEQ_LEN, samples_per_shard=20)
    return out


@pytest.fixture
def corpus_copy(tmp_path, corpus) -> Path:
    return Path(shutil.copytree(corpus, tmp_path / "copy"))


def token_stream(tokenizer, path: Path) -> list[int]:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [i for ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for i in ids]


def raw_samples(corpus_dir: Path) -> list[tuple[str, np.ndarray]]:
    """Samples read with plain tarfile + numpy (independent of the project's reader), in manifest order."""
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    out = []
    for shard in manifest["shards"]:
        with tarfile.open(corpus_dir / shard["file"]) as tar:
            members = tar.getmembers()
            assert len(members) == shard["samples"]
            for member in members:
                out.append((member.name, np.load(io.BytesIO(tar.extractfile(member).read()))))
    return out


def make_text(path: Path, n_tokens: int) -> Path:
    """A line of `n_tokens` single-token vocabulary words."""
    path.write_text(" ".join(WORDS[i % len(WORDS)] for i in range(n_tokens)) + "\n")
    return path


def stream_one_epoch(corpus_dir: Path) -> None:
    manifest = CorpusManifest.load(corpus_dir)
    loader = build_stream_loader(corpus_dir, batch_size=4, rank=0, world_size=1, seed=0, num_workers=0,
                                 shuffle_shards_per_group=len(manifest.shards))
    for _, _batch in zip(range(manifest.num_samples // 4 + 1), loader):
        pass


def test_round_trip_reassembles_the_token_stream(corpus, tokenizer, text_file):
    manifest = CorpusManifest.load(corpus)
    samples = raw_samples(corpus)
    expected = token_stream(tokenizer, text_file)
    piece = SEQ_LEN - 2

    inner = []
    for index, (name, ids) in enumerate(samples):
        shard, i = divmod(index, 20)
        assert name == f"{shard:05d}-{i:07d}.ids.npy"
        assert ids.dtype == np.int32 and ids.ndim == 1 and len(ids) <= SEQ_LEN
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert tokenizer.cls_token_id not in ids[1:-1] and tokenizer.sep_token_id not in ids[1:-1]
        assert tokenizer.pad_token_id not in ids
        if index < len(samples) - 1:
            assert len(ids) == SEQ_LEN
        inner.extend(ids[1:-1].tolist())
    tail = len(expected) % piece
    assert inner == expected[: len(inner)]
    assert len(expected) - len(inner) == (tail if tail < 8 else 0)

    assert manifest.seq_len == SEQ_LEN
    assert manifest.num_samples == len(samples)
    assert manifest.num_tokens == sum(len(ids) for _, ids in samples)
    assert [s["samples"] for s in manifest.shards[:-1]] == [20] * (len(manifest.shards) - 1)
    assert [s["file"] for s in manifest.shards] == [f"shard-{i:05d}.tar" for i in range(len(manifest.shards))]
    assert (manifest.pad_token_id, manifest.cls_token_id, manifest.sep_token_id) == (
        tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert manifest.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert manifest.sources == [str(text_file.resolve())]
    assert [k for k, _ in read_shard(corpus / "shard-00000.tar", SEQ_LEN)] == [f"00000-{i:07d}" for i in range(20)]
    assert not [p for p in corpus.parent.iterdir() if p.name.startswith(".")], "temporary dirs left behind"


@pytest.mark.parametrize("tail, kept", [(9, True), (7, False)])
def test_final_partial_piece_kept_padded_only_with_enough_tokens(tmp_path, tokenizer, tail, kept):
    seq_len = 16
    text = make_text(tmp_path / "t.txt", 2 * (seq_len - 2) + tail)
    manifest = prepare_corpus([str(text)], tokenizer, tmp_path / "c", seq_len=seq_len)
    lengths = [len(ids) for _, ids in raw_samples(tmp_path / "c")]
    assert lengths == [seq_len, seq_len] + ([tail + 2] if kept else [])
    assert manifest.num_tokens == sum(lengths)


def test_directory_source_reads_sorted_txt_and_raw_files(tmp_path, tokenizer):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    make_text(src / "b.raw", 20)
    make_text(src / "sub" / "c.txt", 20)
    (src / "notes.md").write_text("ignored " * 50)
    a = src / "a.txt"
    a.write_text("king queen church school " * 5 + "\n")
    prepare_corpus([str(src)], tokenizer, tmp_path / "c", seq_len=16)
    expected = sum((token_stream(tokenizer, f) for f in (a, src / "b.raw", src / "sub" / "c.txt")), [])
    inner = sum((ids[1:-1].tolist() for _, ids in raw_samples(tmp_path / "c")), [])
    assert inner == expected[: len(inner)] and len(expected) - len(inner) < 14


def test_min_shards_rebalances_without_changing_content(tmp_path, tokenizer, text_file, corpus):
    manifest = prepare_corpus([str(text_file)], tokenizer, tmp_path / "c", seq_len=SEQ_LEN,
                              samples_per_shard=1000, min_shards=6)
    counts = [s["samples"] for s in manifest.shards]
    assert len(counts) == 6 and max(counts) - min(counts) <= 1 and sum(counts) == manifest.num_samples
    rebalanced = [ids.tolist() for _, ids in raw_samples(tmp_path / "c")]
    assert rebalanced == [ids.tolist() for _, ids in raw_samples(corpus)]
    assert [k for k, _ in read_shard(tmp_path / "c" / "shard-00005.tar", SEQ_LEN)][0] == "00005-0000000"
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json"] + [
        f"shard-{i:05d}.tar" for i in range(6)]

    with pytest.raises(DataError, match="min_shards=100000"):
        prepare_corpus([str(text_file)], tokenizer, tmp_path / "d", seq_len=SEQ_LEN, min_shards=100000)
    assert not (tmp_path / "d").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fingerprint_stable_across_reload_and_differs_for_other_vocab(tmp_path, tok_dir, tokenizer):
    from transformers import AutoTokenizer, BertTokenizer

    reloaded = BertTokenizer.from_pretrained(str(tok_dir))
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tokenizer)
    saved_elsewhere = tmp_path / "elsewhere"
    tokenizer.save_pretrained(str(saved_elsewhere))
    moved = AutoTokenizer.from_pretrained(str(saved_elsewhere))
    assert tokenizer_fingerprint(moved) == tokenizer_fingerprint(tokenizer)
    other = make_tokenizer(tmp_path / "other", extra_words=3)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    assert len(tokenizer_fingerprint(other)) == 16


def test_validate_accepts_matching_corpus(corpus, tokenizer):
    manifest = validate_corpus(corpus, tokenizer=tokenizer, seq_len=SEQ_LEN, world_size=2, num_workers=2)
    assert manifest == CorpusManifest.load(corpus)


def test_validate_tokenizer_mismatch_names_both_fingerprints_and_fix(tmp_path, corpus, tokenizer):
    other = make_tokenizer(tmp_path / "teacher", extra_words=3)
    other.name_or_path = str(tmp_path / "teacher")
    with pytest.raises(DataError) as err:
        validate_corpus(corpus, tokenizer=other)
    message = str(err.value)
    assert tokenizer_fingerprint(tokenizer) in message and tokenizer_fingerprint(other) in message
    assert str(corpus) in message
    assert f"arc prepare-corpus --tokenizer {tmp_path / 'teacher'}" in message


def test_validate_seq_len_mismatch(corpus):
    with pytest.raises(ConfigError, match=r"seq_len 32 but training uses seq_len 64.*prepare-corpus --seq-len 64"):
        validate_corpus(corpus, seq_len=64)


def test_validate_too_few_shards_for_ranks_and_workers(corpus):
    shards = len(CorpusManifest.load(corpus).shards)
    with pytest.raises(ConfigError, match=rf"{shards} shards.*4 ranks x 4 data workers.*--min-shards 16.*num_workers"):
        validate_corpus(corpus, world_size=4, num_workers=4)
    validate_corpus(corpus, world_size=shards, num_workers=0)


def test_validate_missing_and_empty_shard(corpus_copy):
    (corpus_copy / "shard-00002.tar").unlink()
    with pytest.raises(DataError, match=r"shard-00002\.tar.*missing"):
        validate_corpus(corpus_copy)
    (corpus_copy / "shard-00002.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"shard-00002\.tar is empty"):
        validate_corpus(corpus_copy)


def test_manifest_missing_unparsable_or_wrong_version(tmp_path, corpus_copy):
    with pytest.raises(DataError, match=rf"{tmp_path / 'nowhere' / 'manifest.json'} not found"):
        validate_corpus(tmp_path / "nowhere")
    path = corpus_copy / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(DataError, match=rf"{path} cannot be parsed"):
        CorpusManifest.load(corpus_copy)
    path.write_text(json.dumps({**good, "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99"):
        CorpusManifest.load(corpus_copy)
    path.write_text(json.dumps({**good, "shards": []}))
    with pytest.raises(DataError, match="malformed shard list"):
        CorpusManifest.load(corpus_copy)


def test_refuses_to_overwrite_unless_asked(tmp_path, tokenizer, text_file):
    out = tmp_path / "c"
    out.mkdir()
    prepare_corpus([str(text_file)], tokenizer, out, seq_len=SEQ_LEN)  # an empty directory is fine
    with pytest.raises(DataError, match=rf"{out} is not empty.*overwrite"):
        prepare_corpus([str(text_file)], tokenizer, out, seq_len=16)
    assert CorpusManifest.load(out).seq_len == SEQ_LEN
    prepare_corpus([str(text_file)], tokenizer, out, seq_len=16, overwrite=True)
    assert CorpusManifest.load(out).seq_len == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_bad_sources_and_arguments(tmp_path, tokenizer):
    missing = tmp_path / "no-such-file.txt"
    with pytest.raises(DataError, match=rf"{missing} not found"):
        prepare_corpus([str(missing)], tokenizer, tmp_path / "c")
    with pytest.raises(DataError, match="no corpus sources"):
        prepare_corpus([], tokenizer, tmp_path / "c")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    with pytest.raises(DataError, match=rf"{blank} contains no text"):
        prepare_corpus([str(blank)], tokenizer, tmp_path / "c")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path / 'emptydir'} contains no"):
        prepare_corpus([str(tmp_path / "emptydir")], tokenizer, tmp_path / "c")
    with pytest.raises(ConfigError, match="seq_len must be >= 8"):
        prepare_corpus([str(blank)], tokenizer, tmp_path / "c", seq_len=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.txt", "emptydir"]


def _write_tar(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


@pytest.mark.parametrize(
    "corruption, message",
    [
        ("truncated", "cannot be read as a tar file"),
        ("garbage", "cannot be read as a tar file"),
        ("empty_tar", "contains no samples"),
        ("no_ids", r"sample '00003-0000000' has no ids\.npy"),
        ("two_dim", r"sample '00003-0000000': expected a non-empty 1-D integer array"),
        ("float_ids", r"sample '00003-0000000': expected a non-empty 1-D integer array"),
        ("too_long", r"sample '00003-0000000' has 40 tokens, more than the corpus seq_len 32"),
        ("fewer_samples", "holds 1 samples but the manifest says 20"),
    ],
)
def test_corrupt_shard_raises_data_error_naming_it_when_streamed(corpus_copy, corruption, message):
    shard = corpus_copy / "shard-00003.tar"
    key = "00003-0000000"
    if corruption == "truncated":
        shard.write_bytes(shard.read_bytes()[: 3 * 512 + 100])
    elif corruption == "garbage":
        shard.write_bytes(b"definitely not a tar archive\n" * 100)
    elif corruption == "empty_tar":
        _write_tar(shard, [])
    elif corruption == "no_ids":
        _write_tar(shard, [{"__key__": key, "txt": "hello"}])
    elif corruption == "two_dim":
        _write_tar(shard, [{"__key__": key, "ids.npy": np.zeros((2, 3), np.int32)}])
    elif corruption == "float_ids":
        _write_tar(shard, [{"__key__": key, "ids.npy": np.zeros(5, np.float32)}])
    elif corruption == "too_long":
        _write_tar(shard, [{"__key__": key, "ids.npy": np.ones(40, np.int32)}])
    elif corruption == "fewer_samples":
        _write_tar(shard, [{"__key__": key, "ids.npy": np.ones(10, np.int32)}])
    validate_corpus(corpus_copy)  # cheap checks pass: the damage is only visible when the shard is read
    with pytest.raises(DataError, match=rf"corpus shard {shard}.*{message}"):
        stream_one_epoch(corpus_copy)


# Fuzzing: any damage to a shard's bytes either still reads as valid samples or raises DataError naming the shard,
# never another exception from deep inside tarfile, numpy or webdataset.
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_damage = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 20_000), st.just(b"")),
    st.tuples(st.just("overwrite"), st.integers(0, 20_000), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), st.integers(0, 20_000), st.binary(min_size=1, max_size=64)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damages=st.lists(_damage, min_size=1, max_size=3))
# Found by this test: a "(" in a .npy header made numpy's header parser raise tokenize.TokenError, not DataError.
@example(damages=[("overwrite", 1578, b"(")])
def test_fuzzed_shard_reads_or_raises_data_error(tmp_path_factory, corpus, damages):
    from arc_dist.data.corpus import read_shard

    data = bytearray((corpus / "shard-00000.tar").read_bytes())
    for kind, offset, payload in damages:
        offset = min(offset, len(data))
        if kind == "truncate":
            del data[offset:]
        elif kind == "overwrite":
            data[offset:offset + len(payload)] = payload
        else:
            data[offset:offset] = payload
    shard = tmp_path_factory.mktemp("fuzz") / "shard-00000.tar"
    shard.write_bytes(bytes(data))
    try:
        samples = read_shard(shard, SEQ_LEN)
    except DataError as e:
        assert str(shard) in str(e)
        return
    for _, ids in samples:
        assert ids.ndim == 1 and 0 < len(ids) <= SEQ_LEN and np.issubdtype(ids.dtype, np.integer)
