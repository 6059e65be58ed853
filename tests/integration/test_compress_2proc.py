"""Stage 2 and teacher fine-tuning end to end on 2 CPU ranks: synchronised masks, schedules, resume, export."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from helpers import launch, read_jsonl, scalars, tiny_stage2

pytestmark = pytest.mark.slow

STEPS, REPLACING = 40, 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    finetune, compress = tiny_stage2(root, finetune_steps=30, compress_steps=STEPS, replacing_steps=REPLACING,
                                     eval_every=20)
    (root / "finetune.yaml").write_text(yaml.safe_dump(finetune))
    (root / "compress.yaml").write_text(yaml.safe_dump(compress))
    return root


@pytest.fixture(scope="module")
def teacher(setup):
    run_dir = setup / "teacher"
    launch("launchers/finetune_teacher.py", ["--config", str(setup / "finetune.yaml"), f"run_dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="module")
def compressed(setup, teacher):
    run_dir = setup / "compress"
    launch("launchers/compress.py", ["--config", str(setup / "compress.yaml"), f"run_dir={run_dir}",
                                     f"teacher={teacher / 'model'}"])
    return run_dir


def reevaluate(model_dir, glue_dir) -> float:
    """Accuracy of an exported classifier on the dev set, computed here with plain transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from arc_dist.data.glue import read_glue_tsv

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    dev = read_glue_tsv(glue_dir, "sst2", "dev")
    correct = 0
    with torch.no_grad():
        for ex in dev:
            enc = tok(ex.text_a, truncation=True, max_length=32, return_tensors="pt")
            correct += int(model(**enc).logits.argmax(-1).item() == ex.label)
    return correct / len(dev)


def test_finetuned_teacher_export_reproduces_metric(setup, teacher):
    saved = json.loads((teacher / "model" / "metrics.json").read_text())
    assert saved["accuracy"] > 0.8, f"teacher did not learn the synthetic task: {saved}"
    assert reevaluate(teacher / "model", setup / "glue") == pytest.approx(saved["accuracy"], abs=1e-9)


def test_masks_identical_across_ranks_and_schedule(compressed):
    rows = read_jsonl(compressed / "masks.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    slope = (1 - 0.3) / REPLACING
    for r in rows:
        rank0, rank1 = r["masks"]
        assert rank0 == rank1, f"ranks disagree at step {r['step']}"
        t = r["step"] - 1
        expected = 1.0 if t >= REPLACING else min(1.0, slope * t + 0.3)
        assert r["rate"] == pytest.approx(expected), (t, r["rate"], expected)
        assert any(rank0), "a step ran no student layer"
        if t >= REPLACING:
            assert all(rank0), f"p = 1 phase ran a teacher layer at step {r['step']}"
    assert any(not all(r["masks"][0]) for r in rows if r["step"] <= REPLACING), "replacement never happened"
    logged = scalars(compressed)
    assert logged[1]["train/replacing_rate"] == pytest.approx(0.3)
    assert logged[STEPS]["train/student_layers_active"] == 2.0


def test_compress_export_has_no_adapters_and_reproduces_metric(setup, compressed):
    from transformers import AutoModelForSequenceClassification

    exported = AutoModelForSequenceClassification.from_pretrained(compressed / "student")
    fresh = AutoModelForSequenceClassification.from_pretrained(setup / "student_init", num_labels=2)
    assert set(exported.state_dict()) == set(fresh.state_dict())
    assert exported.config.hidden_size == 64 and exported.config.num_hidden_layers == 2
    saved = json.loads((compressed / "student" / "metrics.json").read_text())
    assert reevaluate(compressed / "student", setup / "glue") == pytest.approx(saved["accuracy"], abs=1e-9)
    best = json.loads((compressed / "best" / "metrics.json").read_text())
    assert best["accuracy"] >= saved["accuracy"]
    tb = scalars(compressed)
    assert {"eval/accuracy", "perf/samples_per_sec", "train/lr", "train/loss"} <= set(tb[STEPS])


def test_resume_reproduces_masks_rates_losses(setup, teacher, compressed):
    run_dir = setup / "compress_resumed"
    args = ["--config", str(setup / "compress.yaml"), f"run_dir={run_dir}", f"teacher={teacher / 'model'}"]
    launch("launchers/compress.py", [*args, "train.stop_at_step=15"])
    assert max(scalars(run_dir)) == 15
    launch("launchers/compress.py", [*args, "--resume", "auto"])
    full, resumed = scalars(compressed), scalars(run_dir)
    full_masks = {r["step"]: r for r in read_jsonl(compressed / "masks.jsonl")}
    resumed_masks = {r["step"]: r for r in read_jsonl(run_dir / "masks.jsonl")}
    for step in range(16, STEPS + 1):
        assert resumed_masks[step] == full_masks[step]
        assert resumed[step]["train/loss"] == pytest.approx(full[step]["train/loss"], rel=1e-6, abs=1e-9), step


def test_zero3_compress_with_logit_kd_through_torchrun(setup, teacher):
    """ZeRO-3 student engine and a ZeRO-3 inference teacher for logit KD: no hang, agreeing masks, an export."""
    run_dir = setup / "compress_zero3"
    launch("launchers/compress.py", ["--config", str(setup / "compress.yaml"), f"run_dir={run_dir}",
                                     f"teacher={teacher / 'model'}", "train.steps=12",
                                     "schedule.replacing_steps=8", "data.eval_every_steps=0",
                                     "checkpoint.every_steps=0", "kd.weight=0.5", "kd.temperature=2.0",
                                     "train.student_ds_config=ds_configs/student_zero3.json"],
           launcher="torchrun", timeout=400)
    rows = read_jsonl(run_dir / "masks.jsonl")
    assert len(rows) == 12 and all(r["masks"][0] == r["masks"][1] for r in rows)
    assert (run_dir / "student" / "config.json").is_file()
