"""GLUE tasks for stage 2: task descriptions, a strict reader for the official ``glue_data`` TSV files, the HF hub
fallback, and a pre-tokenised torch dataset.

The reader is strict on purpose. The official files are plain tab-separated text with stray ``"`` characters, a
header-less CoLA and a BOM-prefixed MRPC; a lenient reader (pandas with default quoting, or ``csv.DictReader``)
silently merges, drops or shifts rows, and a fine-tuning run on shifted labels still "works", just badly. Here any
file that does not look like the official layout fails fast with a :class:`DataError` naming the file, the line and
the fix.

Label ids follow the HF ``glue`` dataset (``label_list[i]`` is the file token of id ``i``) so a teacher fine-tuned on
HF data and a student trained from the TSV files agree on what every logit means.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from arc_dist.errors import ConfigError, DataError

_BOM = b"\xef\xbb\xbf"
_TOKENIZE_CHUNK = 2048  # examples per tokenizer call: bounds the peak size of the intermediate python lists
STSB_MAX_SCORE = 5.0


@dataclass(frozen=True)
class TaskSpec:
    """Everything the pipeline needs to know about one GLUE task.

    ``text_fields`` are the internal names of the text inputs (``("sentence",)`` or ``("sentence1", "sentence2")``);
    ``tsv_text_columns``/``tsv_label_column`` say where they live in the official TSV file: header names, or 0-based
    positions for CoLA, which has no header line. ``hf_text_columns`` are the same inputs in the HF ``glue`` dataset.
    """

    name: str
    dir_name: str
    text_fields: tuple[str, ...]
    label_field: str
    num_labels: int
    is_regression: bool
    label_list: tuple[str, ...]
    dev_splits: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    has_header: bool
    tsv_text_columns: tuple[str | int, ...]
    tsv_label_column: str | int
    hf_config: str
    hf_text_columns: tuple[str, ...]

    @property
    def splits(self) -> tuple[str, ...]:
        """Splits with labels (the official test files have none, so they cannot be trained or scored on)."""
        return ("train",) + self.dev_splits

    @property
    def is_pair(self) -> bool:
        """Whether every example has a second text (``text_b``)."""
        return len(self.text_fields) == 2


_PAIR = ("sentence1", "sentence2")
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="cola", dir_name="CoLA", text_fields=("sentence",), label_field="label", num_labels=2,
            is_regression=False, label_list=_BINARY, dev_splits=("dev",), metrics=("mcc",), main_metric="mcc",
            # source, label, original label ("*" or empty), sentence
            has_header=False, tsv_text_columns=(3,), tsv_label_column=1,
            hf_config="cola", hf_text_columns=("sentence",),
        ),
        TaskSpec(
            name="sst2", dir_name="SST-2", text_fields=("sentence",), label_field="label", num_labels=2,
            is_regression=False, label_list=_BINARY, dev_splits=("dev",), metrics=("accuracy",),
            main_metric="accuracy", has_header=True, tsv_text_columns=("sentence",), tsv_label_column="label",
            hf_config="sst2", hf_text_columns=("sentence",),
        ),
        TaskSpec(
            name="mrpc", dir_name="MRPC", text_fields=_PAIR, label_field="label", num_labels=2,
            is_regression=False, label_list=_BINARY, dev_splits=("dev",), metrics=("f1", "accuracy"),
            main_metric="f1", has_header=True, tsv_text_columns=("#1 String", "#2 String"),
            tsv_label_column="Quality", hf_config="mrpc", hf_text_columns=_PAIR,
        ),
        TaskSpec(
            name="qqp", dir_name="QQP", text_fields=_PAIR, label_field="label", num_labels=2,
            is_regression=False, label_list=_BINARY, dev_splits=("dev",), metrics=("f1", "accuracy"),
            main_metric="f1", has_header=True, tsv_text_columns=("question1", "question2"),
            tsv_label_column="is_duplicate", hf_config="qqp", hf_text_columns=("question1", "question2"),
        ),
        TaskSpec(
            name="stsb", dir_name="STS-B", text_fields=_PAIR, label_field="label", num_labels=1,
            is_regression=True, label_list=(), dev_splits=("dev",), metrics=("pearson", "spearman"),
            main_metric="pearson", has_header=True, tsv_text_columns=_PAIR, tsv_label_column="score",
            hf_config="stsb", hf_text_columns=_PAIR,
        ),
        TaskSpec(
            name="mnli", dir_name="MNLI", text_fields=_PAIR, label_field="label", num_labels=3,
            is_regression=False, label_list=("entailment", "neutral", "contradiction"),
            dev_splits=("dev_matched", "dev_mismatched"), metrics=("accuracy",), main_metric="accuracy",
            has_header=True, tsv_text_columns=_PAIR, tsv_label_column="gold_label",
            hf_config="mnli", hf_text_columns=("premise", "hypothesis"),
        ),
        TaskSpec(
            name="qnli", dir_name="QNLI", text_fields=_PAIR, label_field="label", num_labels=2,
            is_regression=False, label_list=_NLI2, dev_splits=("dev",), metrics=("accuracy",),
            main_metric="accuracy", has_header=True, tsv_text_columns=("question", "sentence"),
            tsv_label_column="label", hf_config="qnli", hf_text_columns=("question", "sentence"),
        ),
        TaskSpec(
            name="rte", dir_name="RTE", text_fields=_PAIR, label_field="label", num_labels=2,
            is_regression=False, label_list=_NLI2, dev_splits=("dev",), metrics=("accuracy",),
            main_metric="accuracy", has_header=True, tsv_text_columns=_PAIR, tsv_label_column="label",
            hf_config="rte", hf_text_columns=_PAIR,
        ),
        TaskSpec(
            name="wnli", dir_name="WNLI", text_fields=_PAIR, label_field="label", num_labels=2,
            is_regression=False, label_list=_BINARY, dev_splits=("dev",), metrics=("accuracy",),
            main_metric="accuracy", has_header=True, tsv_text_columns=_PAIR, tsv_label_column="label",
            hf_config="wnli", hf_text_columns=_PAIR,
        ),
    )
}

HF_GLUE_REPO = "nyu-mll/glue"  # the canonical home of the dataset the legacy name "glue" redirects to
_HF_SPLITS = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
              "dev_mismatched": "validation_mismatched"}


def _alias_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_ALIASES: dict[str, str] = {}
for _spec in GLUE_TASKS.values():
    _ALIASES[_alias_key(_spec.name)] = _spec.name
    _ALIASES[_alias_key(_spec.dir_name)] = _spec.name


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The spec of a GLUE task; accepts the canonical name or the spellings people use ("SST-2", "STS-B", "CoLA")."""
    if isinstance(name, TaskSpec):
        return name
    canonical = _ALIASES.get(_alias_key(name)) if isinstance(name, str) else None
    if canonical is None:
        raise ConfigError(f"unknown GLUE task {name!r}; valid tasks: {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[canonical]


def _check_split(spec: TaskSpec, split: str) -> None:
    if split not in spec.splits:
        raise ConfigError(
            f"unknown split {split!r} for GLUE task {spec.name!r}; valid splits: {list(spec.splits)} "
            "(the official test files have no labels and cannot be used for training or evaluation)"
        )


@dataclass
class Example:
    """One labelled GLUE example.

    ``line`` is the 1-based physical line of the TSV file it came from (a header, where there is one, is line 1),
    or for hub data its row position in the split, so a bad prediction can be traced back to its source.
    """

    text_a: str
    text_b: str | None
    label: int | float
    line: int


def _task_dir(data_dir: Path, spec: TaskSpec) -> Path:
    if not data_dir.is_dir():
        problem = "is not a folder" if data_dir.exists() else "does not exist"
        raise DataError(
            f"GLUE data folder {data_dir} {problem}; set data.glue_dir to a glue_data folder holding "
            f"{spec.dir_name}/train.tsv (the layout written by download_glue_data.py)"
        )
    for candidate in (spec.dir_name, spec.name):
        if (data_dir / candidate).is_dir():
            return data_dir / candidate
    found = sorted(p.name for p in data_dir.iterdir())
    raise DataError(
        f"no folder {spec.dir_name!r} (or {spec.name!r}) for GLUE task {spec.name!r} in {data_dir}; "
        f"it contains {found}; point data.glue_dir at the glue_data folder itself"
    )


def _decoded_lines(path: Path, raw: Iterator[bytes]) -> Iterator[str]:
    """Decode line by line so a bad byte is reported on its own line, without loading a 300 MB MNLI file at once."""
    for number, line in enumerate(raw, start=1):
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"line {number} of {path} is not valid UTF-8 ({exc.reason} at byte {exc.start} of the line); "
                "GLUE files are UTF-8 text: re-download the file"
            ) from exc


def _column_index(path: Path, header: list[str], header_line: int, column: str | int) -> int:
    if isinstance(column, int):
        return column
    if column not in header:
        raise DataError(
            f"the header (line {header_line}) of {path} has no column {column!r}; columns found: {header}; "
            "is this the right task's file, taken unchanged from glue_data?"
        )
    return header.index(column)


def _parse_label(spec: TaskSpec, token: str, number: int, path: Path) -> int | float:
    token = token.strip()
    if spec.is_regression:
        try:
            score = float(token)
        except ValueError:
            score = math.nan
        if not (0.0 <= score <= STSB_MAX_SCORE):  # also false for nan
            raise DataError(
                f"label {token!r} on line {number} of {path} is not a similarity score in [0, {STSB_MAX_SCORE:g}]; "
                "fix or remove that line"
            )
        return score
    if token not in spec.label_list:
        raise DataError(
            f"label {token!r} on line {number} of {path} is not one of {list(spec.label_list)}; "
            "fix or remove that line (is this the right task's file?)"
        )
    return spec.label_list.index(token)


def read_glue_tsv(data_dir: str | Path, task: str | TaskSpec, split: str) -> list[Example]:
    """Read ``<data_dir>/<TaskDir>/<split>.tsv`` of the official ``glue_data`` tree into labelled examples.

    Fields are tab-separated with no quote handling (the files hold stray ``"``), a UTF-8 BOM is skipped (MRPC),
    blank lines are ignored, and every row must have as many fields as the header (CoLA: 4): a row with a different
    count means a damaged file whose columns can no longer be trusted.
    """
    spec = get_task(task)
    _check_split(spec, split)
    task_dir = _task_dir(Path(data_dir), spec)
    path = task_dir / f"{split}.tsv"
    if not path.is_file():
        found = sorted(p.name for p in task_dir.iterdir())
        raise DataError(f"GLUE file {path} is missing; {task_dir} contains {found}; expected {split}.tsv there")
    if path.stat().st_size == 0:
        raise DataError(f"GLUE file {path} is empty (line 1); re-download it")

    with path.open("rb") as raw:
        reader = csv.reader(_decoded_lines(path, raw), delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            examples = _read_rows(spec, path, reader)
        except csv.Error as exc:
            raise DataError(f"line {reader.line_num} of {path} cannot be parsed as TSV ({exc}); fix that line") from exc
    if not examples:
        where = "after the header" if spec.has_header else "that is not blank"
        raise DataError(f"GLUE file {path} has no examples (no line {where}); re-download it")
    return examples


def _read_rows(spec: TaskSpec, path: Path, reader: Any) -> list[Example]:
    """The row loop of :func:`read_glue_tsv`; ``reader.line_num`` is the physical line of the row just read."""
    if spec.has_header:
        header = next((row for row in reader if row), None)
        if header is None:
            raise DataError(f"GLUE file {path} is empty (no header line up to line {reader.line_num}); re-download it")
        header = [name.strip() for name in header]
        header_line = reader.line_num
        width = len(header)
        layout = f"the header on line {header_line} has {width}"
    else:
        header, header_line, width = [], 0, 4
        layout = f"{spec.dir_name} rows have {width}"
    text_idx = [_column_index(path, header, header_line, c) for c in spec.tsv_text_columns]
    label_idx = _column_index(path, header, header_line, spec.tsv_label_column)

    examples: list[Example] = []
    for row in reader:
        if not row:
            continue
        number = reader.line_num
        if len(row) != width:
            kind = "too few" if len(row) < width else "too many"
            raise DataError(
                f"line {number} of {path} has {kind} columns: {len(row)} tab-separated fields, but {layout}; "
                "fix or remove that line (the file may be truncated or edited)"
            )
        texts = [row[i] for i in text_idx]
        examples.append(
            Example(
                text_a=texts[0],
                text_b=texts[1] if len(texts) > 1 else None,
                label=_parse_label(spec, row[label_idx], number, path),
                line=number,
            )
        )
    return examples


def examples_from_hf(task: str | TaskSpec, rows: Any) -> list[Example]:
    """Map rows of the HF ``glue`` dataset (any iterable of dicts with its column names) to :class:`Example`.

    HF label ids already use :attr:`TaskSpec.label_list`'s order; unlabelled rows (``-1``, the test splits) are an
    error because they cannot be trained or scored on.
    """
    spec = get_task(task)
    examples: list[Example] = []
    for position, row in enumerate(rows):
        try:
            texts = [row[c] for c in spec.hf_text_columns]
            label = row["label"]
        except KeyError as exc:
            raise DataError(
                f"row {position} of the HF glue/{spec.hf_config} data has no column {exc}; "
                f"expected {list(spec.hf_text_columns) + ['label']}"
            ) from exc
        if spec.is_regression:
            label = float(label)
            valid = 0.0 <= label <= STSB_MAX_SCORE
        else:
            label = int(label)
            valid = 0 <= label < spec.num_labels
        if not valid:
            raise DataError(f"row {position} of the HF glue/{spec.hf_config} data has an invalid label {label!r}")
        examples.append(
            Example(text_a=texts[0], text_b=texts[1] if len(texts) > 1 else None, label=label, line=position)
        )
    if not examples:
        raise DataError(f"the HF glue/{spec.hf_config} data has no examples")
    return examples


def load_glue(task: str | TaskSpec, split: str, data_dir: str | Path | None) -> list[Example]:
    """Labelled examples of one GLUE split: from the local ``glue_data`` folder when given, else from the HF hub.

    ``split`` uses this project's names (``train``, ``dev``, ``dev_matched``, ``dev_mismatched``) in both cases.
    """
    spec = get_task(task)
    _check_split(spec, split)
    if data_dir is not None:
        return read_glue_tsv(data_dir, spec, split)

    import datasets  # imported here: the local-file path must not pay for (or depend on) the hub stack

    hf_split = _HF_SPLITS[split]
    try:
        rows = datasets.load_dataset(HF_GLUE_REPO, spec.hf_config, split=hf_split)
    except OSError as exc:  # covers ConnectionError, hub HTTP errors and "dataset not found" (all OSError)
        raise DataError(
            f"could not load GLUE {spec.name}/{split} from the HF hub ({HF_GLUE_REPO}, config {spec.hf_config!r}, "
            f"split {hf_split!r}): {type(exc).__name__}: {exc}; without hub access, pass a local glue_data folder "
            f"as data.glue_dir (with {spec.dir_name}/{split}.tsv inside)"
        ) from exc
    return examples_from_hf(spec, rows)


class GlueDataset(Dataset):
    """GLUE examples tokenised once, up front, so data-loader workers only slice arrays.

    Token ids are kept in one flat ``int64`` array with offsets rather than a list of lists: MNLI's 393k examples
    as python ints would take several GB per data-loader worker. Each item carries ``index`` (its position in
    ``examples``) so distributed evaluation can put the gathered predictions back in order; callers drop it before
    the model's forward. Labels are ``float`` for regression (all labels are floats, as for STS-B) and ``long``
    otherwise.
    """

    def __init__(self, examples: Sequence[Example], tokenizer: Any, max_seq_len: int) -> None:
        if not examples:
            raise DataError("GlueDataset got no examples; check the task's split and data.glue_dir")
        pair = examples[0].text_b is not None
        if any((ex.text_b is not None) != pair for ex in examples):
            raise DataError("GlueDataset got a mix of single-sentence and sentence-pair examples; use one task")
        min_len = tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)
        if not isinstance(max_seq_len, int) or max_seq_len < min_len:
            raise ConfigError(f"max_seq_len must be an int >= {min_len} for this tokenizer, got {max_seq_len!r}")

        floats = [isinstance(ex.label, float) for ex in examples]
        if any(floats) and not all(floats):
            raise DataError("GlueDataset got both float (regression) and int (class) labels; use one task")
        self.is_regression = all(floats)
        label_dtype = torch.float32 if self.is_regression else torch.long
        self.labels = torch.tensor([ex.label for ex in examples], dtype=label_dtype)

        ids: list[np.ndarray] = []
        types: list[np.ndarray] = []
        lengths: list[int] = []
        for start in range(0, len(examples), _TOKENIZE_CHUNK):
            chunk = examples[start : start + _TOKENIZE_CHUNK]
            enc = tokenizer(
                [ex.text_a for ex in chunk],
                [ex.text_b for ex in chunk] if pair else None,
                truncation=True,
                max_length=max_seq_len,
                padding=False,
                return_attention_mask=False,
            )
            for seq in enc["input_ids"]:
                ids.append(np.asarray(seq, dtype=np.int64))
                lengths.append(len(seq))
            if "token_type_ids" in enc:
                types.extend(np.asarray(seq, dtype=np.int64) for seq in enc["token_type_ids"])
        self.input_ids = np.concatenate(ids)
        self.token_type_ids = np.concatenate(types) if types else None
        self.offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        item = {
            "input_ids": torch.from_numpy(self.input_ids[start:end].copy()),
            "attention_mask": torch.ones(end - start, dtype=torch.long),
            "labels": self.labels[index],
            "index": torch.tensor(index, dtype=torch.long),
        }
        if self.token_type_ids is not None:
            item["token_type_ids"] = torch.from_numpy(self.token_type_ids[start:end].copy())
        return item


def collate_glue(batch: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of :class:`GlueDataset` items to the longest sequence in the batch (not to max_seq_len:
    GLUE sentences are short, and padding every batch to 128 or 512 wastes most of the compute)."""
    if not batch:
        raise ValueError("collate_glue got an empty batch")
    longest = max(item["input_ids"].numel() for item in batch)
    pad_values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    out: dict[str, torch.Tensor] = {}
    for key, pad in pad_values.items():
        if key not in batch[0]:
            continue
        padded = torch.full((len(batch), longest), pad, dtype=torch.long)
        for row, item in enumerate(batch):
            seq = item[key]
            padded[row, : seq.numel()] = seq
        out[key] = padded
    out["labels"] = torch.stack([item["labels"] for item in batch])
    out["index"] = torch.stack([item["index"] for item in batch])
    return out
