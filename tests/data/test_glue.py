"""GLUE reading: the real glue_data files, synthetic files in the official layouts of the tasks not shipped here,
every error path, the tokenised dataset and its collate function, and fuzzing of the reader."""

from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arc_dist.data.glue import (
    GLUE_TASKS,
    Example,
    GlueDataset,
    collate_glue,
    examples_from_hf,
    get_task,
    load_glue,
    read_glue_tsv,
)
from arc_dist.errors import ConfigError, DataError
from helpers import make_tokenizer

GLUE_DIR = Path(__file__).parents[2].parent / "shared" / "data" / "glue"
needs_real_glue = pytest.mark.skipif(
    not GLUE_DIR.is_dir(), reason=f"real GLUE files not found at {GLUE_DIR} (the shared data folder is absent)"
)

# (task, split) -> data rows, as in SOURCE.md and the official GLUE counts
REAL_COUNTS = {
    ("cola", "train"): 8551, ("cola", "dev"): 1043,
    ("sst2", "train"): 67349, ("sst2", "dev"): 872,
    ("mrpc", "train"): 3668, ("mrpc", "dev"): 408,
    ("rte", "train"): 2490, ("rte", "dev"): 277,
    ("wnli", "train"): 635, ("wnli", "dev"): 71,
}
# label-id counts of the real files (HF glue reports the same class balance, e.g. CoLA train 6023 acceptable)
REAL_LABEL_COUNTS = {
    ("cola", "train"): {1: 6023, 0: 2528}, ("cola", "dev"): {1: 721, 0: 322},
    ("sst2", "train"): {1: 37569, 0: 29780}, ("sst2", "dev"): {1: 444, 0: 428},
    ("mrpc", "train"): {1: 2474, 0: 1194}, ("mrpc", "dev"): {1: 279, 0: 129},
    ("rte", "train"): {0: 1249, 1: 1241}, ("rte", "dev"): {0: 146, 1: 131},
    ("wnli", "train"): {0: 323, 1: 312}, ("wnli", "dev"): {0: 40, 1: 31},
}

HEADERS = {
    "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
    "stsb": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
    "mnli_train": [
        "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
        "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label",
    ],
    "mnli_dev": [
        "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
        "sentence1_parse", "sentence2_parse", "sentence1", "sentence2",
        "label1", "label2", "label3", "label4", "label5", "gold_label",
    ],
    "qnli": ["index", "question", "sentence", "label"],
    "rte": ["index", "sentence1", "sentence2", "label"],
    "sst2": ["sentence", "label"],
}


def write_file(root: Path, folder: str, split: str, content: bytes | str) -> Path:
    """Write `<root>/<folder>/<split>.tsv` byte for byte (no newline translation)."""
    path = root / folder / f"{split}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def tsv(rows: list[list[str]]) -> str:
    return "".join("\t".join(row) + "\n" for row in rows)


# ---------------------------------------------------------------------------------------------------- task specs


def test_aliases() -> None:
    for alias, name in [
        ("SST-2", "sst2"), ("sst-2", "sst2"), ("sst2", "sst2"), ("STS-B", "stsb"), ("sts_b", "stsb"),
        ("CoLA", "cola"), ("COLA", "cola"), ("MRPC", "mrpc"), ("MNLI", "mnli"), ("qnli", "qnli"), ("Rte", "rte"),
        ("WNLI", "wnli"), ("QQP", "qqp"),
    ]:
        assert get_task(alias).name == name
    assert get_task(GLUE_TASKS["rte"]) is GLUE_TASKS["rte"]
    with pytest.raises(ConfigError, match=r"unknown GLUE task 'sst3'.*'cola'.*'wnli'") as info:
        get_task("sst3")
    assert isinstance(info.value, ValueError)  # ConfigError is also a ValueError


def test_task_specs_follow_hf_label_order() -> None:
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert GLUE_TASKS["mnli"].label_list == ("entailment", "neutral", "contradiction")
    assert GLUE_TASKS["rte"].label_list == GLUE_TASKS["qnli"].label_list == ("entailment", "not_entailment")
    assert GLUE_TASKS["mnli"].dev_splits == ("dev_matched", "dev_mismatched")
    stsb = GLUE_TASKS["stsb"]
    assert stsb.is_regression and stsb.num_labels == 1
    for spec in GLUE_TASKS.values():
        assert len(spec.text_fields) in (1, 2) and spec.is_pair == (len(spec.text_fields) == 2)
        assert len(spec.tsv_text_columns) == len(spec.hf_text_columns) == len(spec.text_fields)
        assert spec.is_regression or len(spec.label_list) == spec.num_labels


def test_unknown_split_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'dev'.*\['train', 'dev_matched', 'dev_mismatched'\]"):
        read_glue_tsv(tmp_path, "mnli", "dev")
    with pytest.raises(ConfigError, match="test files have no labels"):
        load_glue("rte", "test", tmp_path)


# ---------------------------------------------------------------------------------------------------- real files


@needs_real_glue
def test_real_counts_match_source_md() -> None:
    """The expected counts above are the ones SOURCE.md records, so neither can drift alone."""
    table = {}
    for match in re.finditer(r"^\| (\S+) \| (train|dev)\.tsv \| (\d+)", (GLUE_DIR / "SOURCE.md").read_text(), re.M):
        table[(get_task(match[1]).name, match[2])] = int(match[3])
    assert table == REAL_COUNTS


@needs_real_glue
@pytest.mark.parametrize(("task", "split"), sorted(REAL_COUNTS))
def test_real_files(task: str, split: str) -> None:
    examples = load_glue(task, split, GLUE_DIR)
    spec = get_task(task)
    assert len(examples) == REAL_COUNTS[(task, split)]
    assert dict(Counter(ex.label for ex in examples)) == REAL_LABEL_COUNTS[(task, split)]
    assert all(isinstance(ex.label, int) for ex in examples)
    assert all((ex.text_b is not None) == spec.is_pair and ex.text_a.strip() for ex in examples)
    # line numbers point at the source line (after the header line where there is one), which holds the texts
    lines = (GLUE_DIR / spec.dir_name / f"{split}.tsv").read_text(encoding="utf-8-sig").split("\n")
    first = 2 if spec.has_header else 1
    assert [ex.line for ex in examples] == list(range(first, first + len(examples)))
    for ex in (examples[0], examples[len(examples) // 2], examples[-1]):
        fields = lines[ex.line - 1].split("\t")
        assert ex.text_a in fields and (ex.text_b is None or ex.text_b in fields)


@needs_real_glue
def test_real_quirks() -> None:
    # SOURCE.md: the first SST-2 dev row, trailing space included
    first = read_glue_tsv(GLUE_DIR, "SST-2", "dev")[0]
    assert (first.text_a, first.label, first.line) == ("it 's a charming and often affecting journey . ", 1, 2)
    # MRPC: BOM stripped from the header; stray quotes stay inside their field (QUOTE_NONE)
    mrpc = read_glue_tsv(GLUE_DIR, "mrpc", "dev")
    assert mrpc[0].text_b == '" The foodservice pie business does not fit our long-term growth strategy .'
    assert sum('"' in ex.text_a + ex.text_b for ex in mrpc) > 10
    # RTE labels are words, mapped with HF's order (entailment = 0)
    rte = read_glue_tsv(GLUE_DIR, "rte", "dev")
    assert rte[0].label == 1  # "Christopher Reeve had an accident." is not_entailment in the file


# ---------------------------------------------------------------------------------------------------- synthetic layouts


def _texts(i: int) -> tuple[str, str]:
    # stray quotes and odd characters as in the real files; no tabs or newlines (they cannot be in a TSV field)
    return f'what is " thing {i} ?', f"it's 'x' {i} \"half-quoted"


def test_qqp_round_trip(tmp_path: Path) -> None:
    rows = [HEADERS["qqp"]] + [[str(i), str(2 * i), str(2 * i + 1), *_texts(i), str(i % 2)] for i in range(7)]
    write_file(tmp_path, "QQP", "train", tsv(rows))
    examples = read_glue_tsv(tmp_path, "qqp", "train")
    assert examples == [Example(*_texts(i), label=i % 2, line=i + 2) for i in range(7)]


def test_stsb_round_trip(tmp_path: Path) -> None:
    scores = ["0.000", "5.000", "2.500", "3.8", "1"]
    rows = [HEADERS["stsb"]] + [
        [str(i), "main-news", "MSRvid", "2012test", f"{i:04d}", "none", "none", *_texts(i), s]
        for i, s in enumerate(scores)
    ]
    write_file(tmp_path, "STS-B", "dev", tsv(rows))
    examples = read_glue_tsv(tmp_path, "sts-b", "dev")
    assert [ex.label for ex in examples] == [0.0, 5.0, 2.5, 3.8, 1.0]
    assert all(isinstance(ex.label, float) for ex in examples)
    assert [(ex.text_a, ex.text_b) for ex in examples] == [_texts(i) for i in range(5)]


@pytest.mark.parametrize("split", ["train", "dev_matched", "dev_mismatched"])
def test_mnli_round_trip(tmp_path: Path, split: str) -> None:
    gold = ["neutral", "contradiction", "entailment", "neutral"]
    header = HEADERS["mnli_train" if split == "train" else "mnli_dev"]
    n_annotations = sum(h.startswith("label") for h in header)  # label1 in train, label1..label5 in dev
    rows = [header]
    for i, g in enumerate(gold):
        parses = ["( ( a b ) c )", "( d e )", "(ROOT (S (NP a)))", "(ROOT (NP d))"]
        rows.append([str(i), f"{i}1", f"{i}1{'ceg'[i % 3]}", "fiction", *parses, *_texts(i), *[g] * n_annotations, g])
    write_file(tmp_path, "MNLI", split, tsv(rows))
    examples = read_glue_tsv(tmp_path, "mnli", split)
    assert [ex.label for ex in examples] == [1, 2, 0, 1]  # HF: entailment 0, neutral 1, contradiction 2
    assert [(ex.text_a, ex.text_b) for ex in examples] == [_texts(i) for i in range(4)]


def test_qnli_round_trip_and_lowercase_folder(tmp_path: Path) -> None:
    labels = ["entailment", "not_entailment", "not_entailment"]
    rows = [HEADERS["qnli"]] + [[str(i), *_texts(i), lab] for i, lab in enumerate(labels)]
    write_file(tmp_path, "qnli", "dev", tsv(rows))  # the canonical name is accepted as folder too
    examples = read_glue_tsv(tmp_path, "QNLI", "dev")
    assert [ex.label for ex in examples] == [0, 1, 1]


def test_crlf_bom_and_blank_lines_are_tolerated(tmp_path: Path) -> None:
    content = "\ufeffsentence\tlabel\r\n\r\na film .\t1\r\nbad film .\t0\r\n\n"
    write_file(tmp_path, "SST-2", "train", content)
    examples = read_glue_tsv(tmp_path, "sst2", "train")
    assert [(ex.text_a, ex.label, ex.line) for ex in examples] == [("a film .", 1, 3), ("bad film .", 0, 4)]


# ---------------------------------------------------------------------------------------------------- errors


def _error(tmp_path: Path, task: str, split: str = "train") -> str:
    with pytest.raises(DataError) as info:
        read_glue_tsv(tmp_path, task, split)
    return str(info.value)


def test_missing_folder_and_file(tmp_path: Path) -> None:
    msg = _error(tmp_path / "nowhere", "cola")
    assert "nowhere" in msg and "data.glue_dir" in msg
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    msg = _error(tmp_path, "cola")
    assert "'CoLA'" in msg and "['SST-2', 'notes.txt']" in msg
    write_file(tmp_path, "SST-2", "train_full", "sentence\tlabel\na\t1\n")
    msg = _error(tmp_path, "sst2", "dev")
    assert "dev.tsv" in msg and "['train_full.tsv']" in msg


@pytest.mark.parametrize("content", [b"", b"\xef\xbb\xbf", b"\n\n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = write_file(tmp_path, "RTE", "train", content)
    msg = _error(tmp_path, "rte")
    assert str(path) in msg and "empty" in msg and re.search(r"line \d", msg)


def test_header_only_has_no_examples(tmp_path: Path) -> None:
    path = write_file(tmp_path, "RTE", "train", tsv([HEADERS["rte"]]))
    msg = _error(tmp_path, "rte")
    assert str(path) in msg and "no examples" in msg and "after the header" in msg
    path = write_file(tmp_path, "CoLA", "train", "\n")
    msg = _error(tmp_path, "cola")
    assert str(path) in msg and "no examples" in msg


def test_missing_column(tmp_path: Path) -> None:
    path = write_file(tmp_path, "MRPC", "train", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 Strings\n1\t1\t2\ta\tb\n")
    msg = _error(tmp_path, "mrpc")
    assert str(path) in msg and "line 1" in msg and "'#2 String'" in msg
    assert "['Quality', '#1 ID', '#2 ID', '#1 String', '#2 Strings']" in msg


@pytest.mark.parametrize(("row", "kind"), [(["7", "a"], "too few"), (["7", "a", "b", "entailment", "x"], "too many")])
def test_wrong_column_count(tmp_path: Path, row: list[str], kind: str) -> None:
    good = [[str(i), "p", "h", "entailment"] for i in range(4)]
    path = write_file(tmp_path, "RTE", "train", tsv([HEADERS["rte"], *good, row, *good]))
    msg = _error(tmp_path, "rte")
    assert f"line 6 of {path} has {kind} columns" in msg and "header on line 1 has 4" in msg


def test_cola_wrong_column_count(tmp_path: Path) -> None:
    path = write_file(tmp_path, "CoLA", "dev", "gj04\t1\t\tA sentence.\ngj04\t1\tA sentence without the empty column.\n")
    msg = _error(tmp_path, "cola", "dev")
    assert f"line 2 of {path} has too few columns" in msg


def test_unknown_label(tmp_path: Path) -> None:
    rows = [HEADERS["sst2"]] + [["fine", "1"]] * 15 + [["odd", "x"]]
    path = write_file(tmp_path, "SST-2", "train", tsv(rows))
    assert f"label 'x' on line 17 of {path} is not one of ['0', '1']" in _error(tmp_path, "sst2")
    rows = [HEADERS["mnli_train"], [*map(str, range(10)), "neutral", "-"]]
    path = write_file(tmp_path, "MNLI", "train", tsv(rows))
    assert f"label '-' on line 2 of {path} is not one of ['entailment', 'neutral', 'contradiction']" in _error(
        tmp_path, "mnli"
    )


@pytest.mark.parametrize("score", ["5.5", "-0.1", "nan", "inf", "high", ""])
def test_bad_stsb_score(tmp_path: Path, score: str) -> None:
    rows = [HEADERS["stsb"], [*"0123456", "a", "b", "1.0"], [*"0123456", "a", "b", score]]
    path = write_file(tmp_path, "STS-B", "train", tsv(rows))
    assert f"label '{score}' on line 3 of {path} is not a similarity score in [0, 5]" in _error(tmp_path, "stsb")


def test_invalid_utf8_names_its_line(tmp_path: Path) -> None:
    path = write_file(tmp_path, "WNLI", "train", b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\t\xff\xfe\tb\t0\n")
    msg = _error(tmp_path, "wnli")
    assert f"line 3 of {path} is not valid UTF-8" in msg


def test_lone_carriage_return_names_its_line(tmp_path: Path) -> None:
    path = write_file(tmp_path, "WNLI", "train", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\ta\rb\tc\t0\n")
    msg = _error(tmp_path, "wnli")
    assert f"line 3 of {path} cannot be parsed as TSV" in msg


# ---------------------------------------------------------------------------------------------------- HF path


def test_hub_failure_says_to_use_a_local_folder() -> None:
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    if not hub_constants.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set: the hub might be reachable, and this test must not download")
    with pytest.raises(DataError, match=r"nyu-mll/glue.*'cola'.*'validation'.*data\.glue_dir.*CoLA/dev\.tsv"):
        load_glue("CoLA", "dev", None)


def test_examples_from_hf_rows() -> None:
    """Rows with HF glue's own schema (built locally with `datasets`) map onto our ids unchanged."""
    datasets = pytest.importorskip("datasets")
    nli = datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])
    features = datasets.Features(
        {"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"), "label": nli,
         "idx": datasets.Value("int32")}
    )
    rows = datasets.Dataset.from_dict(
        {"premise": ["p0", "p1"], "hypothesis": ["h0", "h1"], "label": [2, 0], "idx": [0, 1]}, features=features
    )
    assert examples_from_hf("mnli", rows) == [Example("p0", "h0", 2, 0), Example("p1", "h1", 0, 1)]
    stsb = examples_from_hf("stsb", [{"sentence1": "a", "sentence2": "b", "label": 4.2, "idx": 0}])
    assert stsb == [Example("a", "b", pytest.approx(4.2), 0)] and isinstance(stsb[0].label, float)
    with pytest.raises(DataError, match="invalid label -1"):  # HF test splits are unlabelled
        examples_from_hf("cola", [{"sentence": "a", "label": -1, "idx": 0}])
    with pytest.raises(DataError, match="no column 'question1'"):
        examples_from_hf("qqp", [{"sentence1": "a", "sentence2": "b", "label": 0}])


# ---------------------------------------------------------------------------------------------------- dataset + collate


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_dataset_pairs_and_collate(tokenizer) -> None:
    examples = [
        Example("the city", "the king of the north", 1, 2),
        Example("a river", "war", 0, 3),
        Example("the old school " * 20, "a new park " * 20, 1, 4),  # longer than max_seq_len
    ]
    ds = GlueDataset(examples, tokenizer, max_seq_len=16)
    assert len(ds) == 3
    item = ds[1]
    assert item["input_ids"].tolist()[0] == tokenizer.cls_token_id
    assert item["input_ids"].tolist().count(tokenizer.sep_token_id) == 2
    assert item["token_type_ids"].tolist() == [0] * 4 + [1] * 2  # [CLS] a river [SEP] | war [SEP]
    assert item["labels"].dtype == torch.long and int(item["index"]) == 1
    assert ds[2]["input_ids"].numel() == 16  # truncated to max_seq_len

    batch = collate_glue([ds[0], ds[1]], pad_token_id=tokenizer.pad_token_id)
    longest = ds[0]["input_ids"].numel()
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape == (2, longest)
    assert batch["attention_mask"].sum(1).tolist() == [longest, 6]
    assert batch["input_ids"][1, 6:].eq(tokenizer.pad_token_id).all()
    assert batch["token_type_ids"][1, 6:].eq(0).all()
    assert batch["labels"].tolist() == [1, 0] and batch["index"].tolist() == [0, 1]


def test_dataset_single_sentence_regression_and_loader(tokenizer) -> None:
    examples = [Example(f"the song {'of the year ' * i}", None, float(i) / 2, i) for i in range(10)]
    ds = GlueDataset(examples, tokenizer, max_seq_len=12)
    assert ds[0]["labels"].dtype == torch.float32
    assert ds[3]["token_type_ids"].eq(0).all()
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0),
        collate_fn=functools.partial(collate_glue, pad_token_id=tokenizer.pad_token_id),
    )
    seen = []
    for batch in loader:
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max()) <= 12
        assert batch["labels"].dtype == torch.float32
        # the index lets predictions be put back in order
        assert torch.equal(batch["labels"], torch.tensor([examples[i].label for i in batch["index"]]))
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(10))


def test_dataset_rejects_bad_input(tokenizer) -> None:
    with pytest.raises(DataError, match="no examples"):
        GlueDataset([], tokenizer, 16)
    with pytest.raises(DataError, match="mix of single-sentence and sentence-pair"):
        GlueDataset([Example("a", None, 0, 1), Example("a", "b", 0, 2)], tokenizer, 16)
    with pytest.raises(DataError, match="both float"):
        GlueDataset([Example("a", None, 0, 1), Example("b", None, 0.5, 2)], tokenizer, 16)
    with pytest.raises(ConfigError, match="max_seq_len must be an int >= 5"):
        GlueDataset([Example("a", "b", 0, 1)], tokenizer, 4)


@needs_real_glue
def test_dataset_on_real_rte(tokenizer) -> None:
    examples = read_glue_tsv(GLUE_DIR, "rte", "dev")
    ds = GlueDataset(examples, tokenizer, max_seq_len=64)
    assert len(ds) == 277
    lengths = [ds[i]["input_ids"].numel() for i in range(len(ds))]
    assert max(lengths) == 64 and min(lengths) > 5
    batch = collate_glue([ds[i] for i in range(8)], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (8, max(lengths[:8]))
    assert batch["labels"].tolist() == [ex.label for ex in examples[:8]]


# ---------------------------------------------------------------------------------------------------- fuzzing

_TASKS = sorted(GLUE_TASKS)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Module-scoped: hypothesis runs the test body many times per function-scoped fixture, which it rejects."""
    return tmp_path_factory.mktemp("glue_fuzz")


def _read_fuzzed(root: Path, task: str, content: bytes) -> list[Example] | None:
    """Write `content` as the task's train.tsv and read it: DataError or well-formed examples, nothing else."""
    spec = get_task(task)
    write_file(root, spec.dir_name, "train", content)
    try:
        examples = read_glue_tsv(root, task, "train")
    except DataError:
        return None
    # whatever is returned is well-formed
    assert examples and [ex.line for ex in examples] == sorted({ex.line for ex in examples})
    for ex in examples:
        assert isinstance(ex.text_a, str) and (ex.text_b is not None) == spec.is_pair
        if spec.is_regression:
            assert 0.0 <= ex.label <= 5.0
        else:
            assert ex.label in range(spec.num_labels)
    return examples


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(task=st.sampled_from(_TASKS), content=st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(fuzz_dir: Path, task: str, content: bytes) -> None:
    _read_fuzzed(fuzz_dir, task, content)


_LAYOUTS = {
    "cola": None, "sst2": HEADERS["sst2"], "mrpc": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "qqp": HEADERS["qqp"], "stsb": HEADERS["stsb"], "mnli": HEADERS["mnli_train"], "qnli": HEADERS["qnli"],
    "rte": HEADERS["rte"], "wnli": HEADERS["rte"],
}
_CLEAN_TEXT = st.text(st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)), max_size=12)


@st.composite
def _structured_file(draw: st.DrawFn) -> tuple[str, bytes]:
    """Files in the task's layout (its header, rows of about the right width, mostly valid labels) with corrupted
    details, so the fuzzer gets past the header checks into the row and label parsing."""
    task = draw(st.sampled_from(_TASKS))
    spec = GLUE_TASKS[task]
    header = _LAYOUTS[task]
    width = len(header) if header else 4
    label_at = header.index(spec.tsv_label_column) if header else spec.tsv_label_column
    valid_label = st.sampled_from(spec.label_list) if spec.label_list else st.floats(0, 5).map(str)
    any_field = st.one_of(
        _CLEAN_TEXT,
        st.text(max_size=12),
        st.sampled_from(["", '"', "\ufeff", "\r", "a\rb", "\x00", "x" * 140_000, "-1", "nan", "5.01", "neutral", "2"]),
    )

    def valid_row() -> list[str]:
        row = [draw(_CLEAN_TEXT) for _ in range(width)]
        row[label_at] = draw(valid_label)
        return row

    rows = [
        valid_row() if draw(st.integers(0, 3)) else draw(st.lists(any_field, min_size=width - 1, max_size=width + 1))
        for _ in range(draw(st.integers(0, 6)))
    ]
    lines = ([header] if header and draw(st.integers(0, 5)) else []) + rows
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return task, "".join("\t".join(r) + newline for r in lines).encode("utf-8")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_structured_file())
def test_fuzz_structured(fuzz_dir: Path, case: tuple[str, bytes]) -> None:
    task, content = case
    _read_fuzzed(fuzz_dir, task, content)
