"""Bad input through the real command line: one clear line, exit code 2, nothing written, no stack trace."""

from __future__ import annotations

import subprocess

import pytest

from helpers import PYTHON, REPO, make_bert, make_teacher_dir, make_tokenizer, synthetic_text, child_env


def arc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "arc_dist.cli", *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)


def assert_clear_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-2000:]


def test_unknown_key_suggests_the_right_one(tmp_path):
    proc = arc("distill", "teacher.path=/x", "data.path=/y", "train.stpes=3")
    assert_clear_error(proc, "unknown config key 'train.stpes'; did you mean 'train.steps'?")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_teacher_dir(tmp_path_factory.mktemp("t"), layers=4, hidden=64, heads=4, intermediate=128)


def test_corpus_from_another_tokenizer_is_refused(tmp_path, teacher):
    make_tokenizer(tmp_path / "other", extra_words=7)
    text = synthetic_text(tmp_path / "t.txt", n_lines=100)
    assert arc("prepare-corpus", "--tokenizer", str(tmp_path / "other"), "--out", str(tmp_path / "c"),
               "--seq-len", "32", "--min-shards", "2", str(text)).returncode == 0
    proc = arc("distill", f"teacher.path={teacher}", f"data.path={tmp_path / 'c'}", "data.seq_len=32",
               f"run_dir={tmp_path / 'run'}", "student.hidden=32", "student.heads=4")
    assert_clear_error(proc, "was tokenized with", "arc prepare-corpus")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_relation_heads_not_dividing_widths(tmp_path, teacher):
    proc = arc("distill", f"teacher.path={teacher}", f"data.path={tmp_path}", "student.hidden=48",
               "student.heads=4", "loss.relation_heads=5", f"run_dir={tmp_path / 'run'}")
    assert_clear_error(proc, "num_relation_heads=5 must divide both the teacher width 64 and the student width 48")


def test_teacher_layer_out_of_range_and_missing_teacher(tmp_path, teacher):
    proc = arc("distill", f"teacher.path={teacher}", f"data.path={tmp_path}", "teacher.layer=9",
               f"run_dir={tmp_path / 'run'}")
    assert_clear_error(proc, "teacher.layer=9 is out of range for a 4-layer teacher")
    proc = arc("distill", f"teacher.path={tmp_path / 'nope'}", f"data.path={tmp_path}", f"run_dir={tmp_path / 'r'}")
    assert_clear_error(proc, "does not exist")


def test_student_layers_from_teacher_that_do_not_fit(tmp_path, teacher):
    like_teacher = ["student.hidden=64", "student.heads=4", "student.intermediate=128",
                    "student.embeddings_from_teacher=true"]
    proc = arc("distill", f"teacher.path={teacher}", f"data.path={tmp_path}", f"run_dir={tmp_path / 'run'}",
               *like_teacher, "student.layers=2", "student.layers_from_teacher=[2,5]")
    assert_clear_error(proc, "student.layers_from_teacher=[2, 5]", "out of range: use 1-based numbers 1..4")
    proc = arc("distill", f"teacher.path={teacher}", f"data.path={tmp_path}", f"run_dir={tmp_path / 'run'}",
               *like_teacher, "student.intermediate=256", "student.layers_from_teacher=uniform")
    assert_clear_error(proc, "student.intermediate must equal the teacher's 128, got 256")
    assert not (tmp_path / "run").exists()


def test_mapping_that_does_not_fit(tmp_path, teacher):
    tok = make_tokenizer(tmp_path / "s")
    make_bert(tmp_path / "s", vocab_size=len(tok), layers=3, hidden=32, heads=4)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(teacher)
    cfg.num_labels = 2
    cfg.save_pretrained(teacher)  # a 2-label "fine-tuned" teacher config is enough: the check precedes loading
    proc = arc("replace", f"teacher={teacher}", f"student.path={tmp_path / 's'}", "mapping.kind=block",
               f"data.glue_dir={tmp_path}", "train.steps=10", "schedule.replacing_steps=5",
               f"run_dir={tmp_path / 'run'}")
    assert_clear_error(proc, "block")
