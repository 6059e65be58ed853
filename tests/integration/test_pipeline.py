"""`arc compress`: teacher fine-tuning -> stage 1 -> stage 2 -> report, chained on 2 ranks with tiny models."""

from __future__ import annotations

import json

import pytest

from helpers import launch, make_teacher_dir, synthetic_text, write_sst2

pytestmark = pytest.mark.slow


def test_pipeline_end_to_end(tmp_path):
    teacher = make_teacher_dir(tmp_path / "pretrained", layers=4, hidden=64, heads=4, intermediate=128,
                               max_positions=128)
    write_sst2(tmp_path / "glue", n_train=200, n_dev=40)
    text = synthetic_text(tmp_path / "text.txt", n_lines=600)
    out = tmp_path / "out"
    tiny = ["train.micro_batch_size=8", "train.precision=fp32", "metrics.progress_bar=false", "optim.warmup_steps=2"]
    args = ["compress", "--teacher", str(teacher), "--task", "sst2",
            "--glue-dir", str(tmp_path / "glue"), "--text", str(text), "--out", str(out), "--nprocs", "2",
            "--student-layers", "2", "--student-hidden", "32", "--student-heads", "4"]
    for stage, steps in (("finetune", 16), ("distill", 8), ("compress", 16)):
        args += ["--set", f"{stage}.train.steps={steps}"] + [f"--set={stage}.{o}" for o in tiny]
    for stage in ("finetune", "compress"):
        args += ["--set", f"{stage}.data.train_subset=null", "--set", f"{stage}.data.eval_every_steps=8",
                 "--set", f"{stage}.data.max_seq_len=32"]
    args += ["--set", "compress.schedule.replacing_steps=10"]
    proc = launch("arc_dist/cli.py", args, launcher="python", timeout=600)
    assert "| teacher | 4x64 |" in proc.stdout and "| student | 2x32 |" in proc.stdout, proc.stdout[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["layers"] == 4 and report["student"]["layers"] == 2
    assert report["student"]["params_m"] < report["teacher"]["params_m"]
    assert report["speedup"] > 0 and 0 <= report["student"]["metric"] <= 1
    for stage in ("teacher", "stage1", "stage2"):
        assert json.loads((out / stage / "summary.json").read_text())["completed"]
    # a second invocation finds every stage complete and only reports
    again = launch("arc_dist/cli.py", args, launcher="python", timeout=300)
    assert again.stdout.count("already complete") == 3
