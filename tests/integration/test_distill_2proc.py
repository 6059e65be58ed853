"""Stage 1 end to end on 2 CPU ranks through the real launchers: ZeRO-3 teacher, loss, resume, export."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from helpers import launch, read_jsonl, tiny_stage1

pytestmark = pytest.mark.slow

STEPS = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_stage1(root, STEPS)))
    return root, path


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "tensorboard" / "scalars.jsonl")}


@pytest.fixture(scope="module")
def full_run(setup):
    root, config = setup
    run_dir = root / "full"
    launch("launchers/distill.py", ["--config", str(config), f"run_dir={run_dir}"], launcher="deepspeed")
    return run_dir


def test_loss_goes_down_and_teacher_is_sharded(full_run):
    curve = losses(full_run)
    assert sorted(curve) == list(range(1, STEPS + 1))
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < 0.7 * first, f"relation loss did not go down: first 5 steps {first:.4f}, last 5 {last:.4f}"
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["precision"] in ("fp32", "bf16")  # recorded for glue_table's merge
    held, total = summary["teacher_params_held_per_rank"], summary["teacher_params_total"]
    assert len(held) == 2 and sum(held) >= total
    for n in held:  # ZeRO-3: each rank holds about half (partitions are padded to equal size)
        assert 0.45 * total <= n <= 0.56 * total, (held, total)


def test_tensorboard_scalars_read_back(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/loss_qq", "train/loss_kk", "train/loss_vv", "train/lr", "train/grad_norm",
                "perf/tokens_per_sec", "perf/mfu", "memory/peak_gib"}
    assert expected <= tags, expected - tags
    loss_events = acc.Scalars("train/loss")
    assert [e.step for e in loss_events] == list(range(1, STEPS + 1))
    assert all(e.value > 0 for e in acc.Scalars("perf/tokens_per_sec"))
    assert all(0 < e.value < 1 for e in acc.Scalars("perf/mfu"))
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[2] == pytest.approx(2e-3) and lrs[-1] < lrs[2]  # warm-up reaches the peak, then decays


def test_resume_gives_identical_losses(setup, full_run):
    root, config = setup
    run_dir = root / "resumed"
    launch("launchers/distill.py", ["--config", str(config), f"run_dir={run_dir}", "train.stop_at_step=15"],
           launcher="deepspeed")
    first = losses(run_dir)
    assert max(first) == 15 and not (run_dir / "student").exists()
    launch("launchers/distill.py", ["--config", str(config), f"run_dir={run_dir}", "--resume", "auto"],
           launcher="deepspeed")
    resumed = losses(run_dir)
    full = losses(full_run)
    for step in range(16, STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), (step, resumed[step], full[step])


def test_export_loads_with_automodel_and_matches_checkpoint(full_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModel

    from arc_dist.models.family import QKVExtractor, family_for

    exported = AutoModel.from_pretrained(full_run / "student").eval()
    assert exported.config.num_hidden_layers == 2 and exported.config.hidden_size == 32
    tag = (full_run / "checkpoints" / "latest").read_text().strip()
    state = get_fp32_state_dict_from_zero_checkpoint(str(full_run / "checkpoints"), tag=tag)
    trained = AutoModel.from_config(exported.config).eval()
    missing, unexpected = trained.load_state_dict({k.removeprefix("model."): v for k, v in state.items()},
                                                  strict=False)
    assert not unexpected and all("position_ids" in k or "token_type_ids" in k for k in missing), missing
    ids = torch.randint(5, exported.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    family = family_for(exported.config)
    with torch.no_grad():
        a = QKVExtractor(exported, family, 1)(ids, mask)
        b = QKVExtractor(trained, family, 1)(ids, mask)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_torchrun_zero3_student_bf16(setup):
    root, config = setup
    run_dir = root / "zero3"
    launch("launchers/distill.py", ["--config", str(config), f"run_dir={run_dir}", "train.steps=6",
                                    "train.precision=bf16", "train.student_ds_config=ds_configs/student_zero3.json",
                                    "checkpoint.every_steps=0"], launcher="torchrun")
    curve = losses(run_dir)
    assert sorted(curve) == list(range(1, 7)) and all(v > 0 for v in curve.values())
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModel

    exported = AutoModel.from_pretrained(run_dir / "student")
    assert exported.config.num_hidden_layers == 2
    # The export holds the fp32 master weights gathered from both ranks, not the module's bf16 working copies.
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    masters = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    weights = dict(exported.named_parameters())
    trained = [k for k in weights if k.startswith(("embeddings.", "encoder.layer.0."))]
    assert trained and all(weights[k].dtype == torch.float32 for k in weights)
    for key in trained:
        assert torch.equal(weights[key], masters["model." + key].float()), key
    word = weights["embeddings.word_embeddings.weight"]
    assert not torch.equal(word, word.to(torch.bfloat16).float()), "the export is bf16-rounded"


def test_sigterm_ends_with_a_consistent_checkpoint_and_resumes(setup, full_run):
    """SIGTERM (scancel, node drain) to the launcher: every rank finishes its step, checkpoints, exits; resume
    continues with the uninterrupted run's losses."""
    import signal
    import subprocess
    import time

    from helpers import REPO, VENV_BIN, child_env, free_port

    root, config = setup
    run_dir = root / "sigterm"
    cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           "launchers/distill.py", "--config", str(config), f"run_dir={run_dir}", "checkpoint.every_steps=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    scalars = run_dir / "tensorboard" / "scalars.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not scalars.exists() or len(scalars.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["completed"] is False and 3 <= summary["step"] < STEPS, out[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step_{summary['step']:08d}" and (run_dir / "checkpoints" / tag / "COMPLETE").is_file()
    launch("launchers/distill.py", ["--config", str(config), f"run_dir={run_dir}", "checkpoint.every_steps=0"],
           launcher="deepspeed")
    resumed, full = losses(run_dir), losses(full_run)
    for step in range(summary["step"] + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), step
