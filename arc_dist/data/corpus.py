"""Stage-1 corpus preparation: raw text -> packed token sequences in WebDataset tar shards + a manifest.

Tokenisation happens once, here, instead of in every training run: the trainer only decodes small int arrays,
and the manifest (tokenizer fingerprint, seq_len, per-shard sample counts) lets it refuse a corpus that does not
match the teacher and resume its data stream exactly without opening skipped shards.

The shard format is owned by this module: `prepare_corpus` writes it and `read_shard` reads it back (the streaming
loader in `arc_dist.data.stream` uses `read_shard`), so the two cannot drift apart.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tokenize
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds
from tqdm import tqdm

from arc_dist.errors import ConfigError, DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SAMPLE_FIELD = "ids.npy"
TEXT_SUFFIXES = (".txt", ".raw")
# A final partial piece shorter than this carries too few relations to be worth a padded sequence.
MIN_TAIL_TOKENS = 8
MIN_SEQ_LEN = 8
TOKENIZE_BATCH_LINES = 1000


@dataclass
class CorpusManifest:
    """What a corpus directory contains; saved as `<corpus_dir>/manifest.json`.

    `shards` holds `{"file": "shard-00000.tar", "samples": n}` in write order; the per-shard counts are what lets
    the loader skip to a resume point by arithmetic. `num_tokens` counts real tokens ([CLS]/[SEP] included, padding
    excluded, since padding is never stored).
    """

    tokenizer_name: str
    tokenizer_fingerprint: str
    seq_len: int
    shards: list[dict]
    num_samples: int
    num_tokens: int
    sources: list[str]
    pad_token_id: int
    cls_token_id: int
    sep_token_id: int
    format_version: int = FORMAT_VERSION

    @classmethod
    def load(cls, corpus_dir: str | Path) -> "CorpusManifest":
        """Read and sanity-check `<corpus_dir>/manifest.json`; DataError naming the path on any problem."""
        path = Path(corpus_dir) / MANIFEST_NAME
        fix = "re-run `arc prepare-corpus`"
        if not path.is_file():
            raise DataError(f"corpus manifest {path} not found: {corpus_dir} is not a prepared corpus; {fix}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"corpus manifest {path} cannot be parsed ({exc}); {fix}") from exc
        if not isinstance(raw, dict):
            raise DataError(f"corpus manifest {path} is not a JSON object; {fix}")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise DataError(
                f"corpus manifest {path} has format_version {version!r}, this version of arc-dist reads "
                f"{FORMAT_VERSION}; {fix}"
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(names - raw.keys())
        if missing:
            raise DataError(f"corpus manifest {path} lacks field(s) {', '.join(missing)}; {fix}")
        manifest = cls(**{k: raw[k] for k in names})
        shards_ok = isinstance(manifest.shards, list) and all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("samples"), int)
            and s["samples"] > 0
            for s in manifest.shards
        )
        if not shards_ok or not manifest.shards:
            raise DataError(
                f"corpus manifest {path} has a malformed shard list (need a non-empty list of "
                f'{{"file": str, "samples": int > 0}}); {fix}'
            )
        if sum(s["samples"] for s in manifest.shards) != manifest.num_samples:
            raise DataError(f"corpus manifest {path}: shard sample counts do not add up to num_samples; {fix}")
        return manifest

    def save(self, corpus_dir: str | Path) -> None:
        """Write the manifest atomically, so a reader never sees a half-written file."""
        path = Path(corpus_dir) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash identifying what token ids mean: vocabulary, special ids and lower-casing.

    The name/path is not part of it on purpose: the same tokenizer saved elsewhere must match, and two different
    tokenizers that happen to share a name must not.
    """
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id],
        "do_lower_case": getattr(tokenizer, "do_lower_case", None),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _expand_local(source: str) -> list[Path]:
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"corpus source directory {path} contains no {'/'.join(TEXT_SUFFIXES)} files")
        return files
    raise DataError(f"corpus source {path} not found (expected a text file, a directory, or hf:<dataset>[:<config>])")


def _file_lines(path: Path) -> Iterator[str]:
    # errors="replace": one stray byte in a multi-GB crawl should cost one [UNK], not the whole preparation run.
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from f


def _hf_lines(source: str, split: str, text_field: str) -> Iterator[str]:
    name, _, config = source[len("hf:"):].partition(":")
    if not name:
        raise DataError(f"corpus source {source!r}: expected hf:<dataset_name>[:<config>]")
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, config or None, split=split, streaming=True)
    except Exception as exc:  # datasets raises many unrelated types (network, not-found, bad config)
        raise DataError(f"corpus source {source!r}: cannot load Hugging Face dataset split {split!r} ({exc})") from exc
    for row in dataset:
        if text_field not in row:
            raise DataError(
                f"corpus source {source!r}: rows have no field {text_field!r} (fields: {sorted(row)}); "
                "pass the right --hf-text-field"
            )
        yield from str(row[text_field]).splitlines()


def _source_line_streams(sources: list[str], hf_split: str, hf_text_field: str) -> list[tuple[str, Iterable[str]]]:
    """(label, lines) per input, with every local path checked before any tokenisation starts."""
    streams: list[tuple[str, Iterable[str]]] = []
    for source in sources:
        if source.startswith("hf:"):
            streams.append((source, _hf_lines(source, hf_split, hf_text_field)))
        else:
            streams.extend((str(p), _file_lines(p)) for p in _expand_local(source))
    return streams


def _token_batches(
    streams: list[tuple[str, Iterable[str]]], tokenizer: Any, progress: tqdm
) -> Iterator[list[list[int]]]:
    """Token ids of the non-blank lines, tokenised in batches; DataError for an input without any text."""
    for label, lines in streams:
        batch: list[str] = []
        seen_text = False
        for line in lines:
            progress.update(1)
            line = line.strip()
            if not line:
                continue
            seen_text = True
            batch.append(line)
            if len(batch) == TOKENIZE_BATCH_LINES:
                yield _tokenize(tokenizer, batch)
                batch = []
        if batch:
            yield _tokenize(tokenizer, batch)
        if not seen_text:
            raise DataError(f"corpus source {label} contains no text (only blank lines or empty)")


def _tokenize(tokenizer: Any, lines: list[str]) -> list[list[int]]:
    # verbose=False: lines longer than model_max_length are expected here; they are packed, never fed whole.
    return tokenizer(
        lines, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
    )["input_ids"]


def _pack(token_batches: Iterable[list[list[int]]], seq_len: int, cls_id: int, sep_id: int) -> Iterator[np.ndarray]:
    """MiniLMv2 packing: one concatenated token stream cut into [CLS] piece [SEP] sequences of seq_len tokens."""
    piece = seq_len - 2
    buffer: list[int] = []
    for batch in token_batches:
        for ids in batch:
            buffer.extend(ids)
        start = 0
        while len(buffer) - start >= piece:
            yield np.asarray([cls_id, *buffer[start:start + piece], sep_id], dtype=np.int32)
            start += piece
        del buffer[:start]
    if len(buffer) >= MIN_TAIL_TOKENS:
        yield np.asarray([cls_id, *buffer, sep_id], dtype=np.int32)


def _write_shards(samples: Iterable[np.ndarray], out_dir: Path, samples_per_shard: int) -> tuple[list[dict], int]:
    """Write `samples` into shards of `samples_per_shard`; returns the shard list and the number of real tokens."""
    shards: list[dict] = []
    tokens = 0
    writer: wds.TarWriter | None = None
    try:
        for ids in samples:
            if writer is None or shards[-1]["samples"] == samples_per_shard:
                if writer is not None:
                    writer.close()
                shards.append({"file": f"shard-{len(shards):05d}.tar", "samples": 0})
                # mtime fixed: the same input gives byte-identical shards.
                writer = wds.TarWriter(str(out_dir / shards[-1]["file"]), mtime=0.0)
            writer.write({"__key__": f"{len(shards) - 1:05d}-{shards[-1]['samples']:07d}", SAMPLE_FIELD: ids})
            shards[-1]["samples"] += 1
            tokens += len(ids)
    finally:
        if writer is not None:
            writer.close()
    return shards, tokens


def _balanced_resplit(work_dir: Path, shards: list[dict], min_shards: int, seq_len: int) -> list[dict]:
    """Rewrite `shards` as exactly `min_shards` shards of near-equal size.

    Only reached when the corpus has fewer than min_shards * samples_per_shard samples, so reading it back is
    cheap; equal sizes keep the ranks' epochs balanced.
    """
    old_dir = work_dir / "_undersized"
    old_dir.mkdir()
    for shard in shards:
        os.replace(work_dir / shard["file"], old_dir / shard["file"])
    total = sum(s["samples"] for s in shards)
    sizes = [total // min_shards + (1 if i < total % min_shards else 0) for i in range(min_shards)]

    def all_samples() -> Iterator[np.ndarray]:
        for shard in shards:
            for _, ids in read_shard(old_dir / shard["file"], seq_len, expected_samples=shard["samples"]):
                yield ids

    stream = all_samples()
    new_shards = []
    for index, size in enumerate(sizes):
        name = f"shard-{index:05d}.tar"
        with wds.TarWriter(str(work_dir / name), mtime=0.0) as writer:
            for i in range(size):
                writer.write({"__key__": f"{index:05d}-{i:07d}", SAMPLE_FIELD: next(stream)})
        new_shards.append({"file": name, "samples": size})
    shutil.rmtree(old_dir)
    return new_shards


def prepare_corpus(
    sources: list[str],
    tokenizer: Any,
    out_dir: str | Path,
    seq_len: int = 128,
    samples_per_shard: int = 1000,
    min_shards: int = 1,
    hf_split: str = "train",
    hf_text_field: str = "text",
    overwrite: bool = False,
) -> CorpusManifest:
    """Tokenise and pack `sources` into WebDataset shards under `out_dir`; returns the saved manifest.

    `sources` are text files, directories (their *.txt / *.raw files, sorted) or `hf:<name>[:<config>]` datasets
    (streamed). Text is read line by line, so input size is bounded by disk, not memory. Everything is written to a
    temporary sibling directory that is renamed into place at the end: a crashed run never leaves a directory that
    looks like a finished corpus. Each sample stores only its real tokens ([CLS] ... [SEP], no padding).
    """
    if seq_len < MIN_SEQ_LEN:
        raise ConfigError(f"seq_len must be >= {MIN_SEQ_LEN} (got {seq_len})")
    if samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard must be >= 1 (got {samples_per_shard})")
    if min_shards < 1:
        raise ConfigError(f"min_shards must be >= 1 (got {min_shards})")
    if not sources:
        raise DataError("no corpus sources given: pass text files, directories or hf:<dataset> names")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"corpus output {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(
            f"corpus output directory {out_dir} is not empty; pass overwrite=True (--overwrite) to replace it"
        )
    streams = _source_line_streams(list(sources), hf_split, hf_text_field)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    work_dir.mkdir()
    try:
        with tqdm(desc="tokenizing", unit=" lines", disable=None) as progress:
            packed = _pack(
                _token_batches(streams, tokenizer, progress), seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id
            )
            shards, num_tokens = _write_shards(packed, work_dir, samples_per_shard)
        num_samples = sum(s["samples"] for s in shards)
        if num_samples < min_shards:
            raise DataError(
                f"corpus from {', '.join(sources)} packs into {num_samples} sequences of {seq_len} tokens, fewer "
                f"than min_shards={min_shards}; add text or lower --min-shards"
            )
        if len(shards) < min_shards:
            shards = _balanced_resplit(work_dir, shards, min_shards, seq_len)
        manifest = CorpusManifest(
            tokenizer_name=_tokenizer_name(tokenizer),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            seq_len=seq_len,
            shards=shards,
            num_samples=num_samples,
            num_tokens=num_tokens,
            sources=[s if s.startswith("hf:") else str(Path(s).resolve()) for s in sources],
            pad_token_id=tokenizer.pad_token_id,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
        )
        manifest.save(work_dir)
        _move_into_place(work_dir, out_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return manifest


def _move_into_place(work_dir: Path, out_dir: Path) -> None:
    if out_dir.exists():
        # Move the old corpus aside first so out_dir is either the old or the new corpus, never a mix.
        trash = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, trash)
        os.replace(work_dir, out_dir)
        shutil.rmtree(trash)
    else:
        os.replace(work_dir, out_dir)


def read_shard(path: str | Path, seq_len: int, expected_samples: int | None = None) -> list[tuple[str, np.ndarray]]:
    """All (key, ids) samples of one shard, in file order, validated; DataError naming the shard otherwise.

    The whole shard is read with webdataset's tar iterators and checked before anything is returned, so a corrupt
    shard fails loudly at its first use instead of silently shortening an epoch (which would break exact resume).
    """
    path = Path(path)
    fix = "re-run `arc prepare-corpus`"
    samples: list[tuple[str, np.ndarray]] = []
    try:
        with open(path, "rb") as stream:
            files = wds.tariterators.tar_file_expander([{"url": str(path), "stream": stream}])
            for sample in wds.tariterators.group_by_keys(files):
                samples.append((sample["__key__"], _decode_ids(sample, path, seq_len)))
    except DataError:
        raise
    except (OSError, EOFError, ValueError, tarfile.TarError) as exc:
        # webdataset appends " @ <stream repr>" and extra args to the message; the shard path says it better.
        reason = str(exc.args[0]).split(" @ <")[0] if exc.args else type(exc).__name__
        raise DataError(f"corpus shard {path} cannot be read as a tar file ({reason}); {fix}") from exc
    if not samples:
        raise DataError(f"corpus shard {path} contains no samples; {fix}")
    if expected_samples is not None and len(samples) != expected_samples:
        raise DataError(
            f"corpus shard {path} holds {len(samples)} samples but the manifest says {expected_samples} "
            f"(truncated or replaced shard); {fix}"
        )
    return samples


def _decode_ids(sample: dict, path: Path, seq_len: int) -> np.ndarray:
    key = sample["__key__"]
    where = f"corpus shard {path}, sample {key!r}"
    if SAMPLE_FIELD not in sample:
        fields_found = sorted(k for k in sample if not k.startswith("__"))
        raise DataError(f"{where} has no {SAMPLE_FIELD} field (found {fields_found}); re-run `arc prepare-corpus`")
    try:
        ids = np.load(io.BytesIO(sample[SAMPLE_FIELD]), allow_pickle=False)
    # A damaged .npy header reaches numpy's header parser (ast.literal_eval / tokenize), which raises SyntaxError
    # or tokenize.TokenError rather than ValueError.
    except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError) as exc:
        raise DataError(f"{where}: {SAMPLE_FIELD} is not a valid .npy array ({exc})") from exc
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) == 0:
        raise DataError(f"{where}: expected a non-empty 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if len(ids) > seq_len:
        raise DataError(f"{where} has {len(ids)} tokens, more than the corpus seq_len {seq_len}")
    if ids.min() < 0:
        raise DataError(f"{where} contains negative token ids")
    return ids


def validate_corpus(
    corpus_dir: str | Path,
    tokenizer: Any = None,
    seq_len: int | None = None,
    world_size: int = 1,
    num_workers: int = 1,
) -> CorpusManifest:
    """Check a corpus is complete and fits this run before any training starts; returns its manifest.

    Cheap checks only (manifest, shard files present and non-empty, tokenizer, seq_len, enough shards for every
    rank x worker to own at least one per epoch); shard contents are checked as they are streamed.
    """
    corpus_dir = Path(corpus_dir)
    manifest = CorpusManifest.load(corpus_dir)
    for shard in manifest.shards:
        path = corpus_dir / shard["file"]
        if not path.is_file():
            raise DataError(f"corpus shard {path} listed in the manifest is missing; re-run `arc prepare-corpus`")
        if path.stat().st_size == 0:
            raise DataError(f"corpus shard {path} is empty (0 bytes); re-run `arc prepare-corpus`")
    if tokenizer is not None:
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != manifest.tokenizer_fingerprint:
            name = _tokenizer_name(tokenizer)
            raise DataError(
                f"corpus {corpus_dir} was tokenized with {manifest.tokenizer_name} "
                f"(fingerprint {manifest.tokenizer_fingerprint}) but the teacher's tokenizer is {name} "
                f"(fingerprint {fingerprint}); re-run `arc prepare-corpus --tokenizer {name}`"
            )
    if seq_len is not None and seq_len != manifest.seq_len:
        raise ConfigError(
            f"corpus {corpus_dir} was packed with seq_len {manifest.seq_len} but training uses seq_len {seq_len}; "
            f"set data.seq_len: {manifest.seq_len} or re-run `arc prepare-corpus --seq-len {seq_len}`"
        )
    readers = world_size * max(1, num_workers)
    if len(manifest.shards) < readers:
        raise ConfigError(
            f"corpus {corpus_dir} has {len(manifest.shards)} shards but {world_size} ranks x {max(1, num_workers)} "
            f"data workers need at least {readers}; re-run `arc prepare-corpus` with --min-shards {readers} "
            f"or lower data.num_workers"
        )
    return manifest
